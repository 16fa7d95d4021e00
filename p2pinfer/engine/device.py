"""The engine's configuration: tinygrad's CPU backend and where compiled kernels are kept.

    from p2pinfer.engine import configure
    configure(kernel_cache_dir=data_dir)     # once, before the first model loads (run_agent, `p2pinfer warm`)

tinygrad reads DEV once, when it is imported, so the backend must be chosen first. Agents are started by
users without env vars, so the engine picks the fastest backend that works here: LLVM (libLLVM >= 16;
Debian's 14/15 miscompile or fail), else clang, else tinygrad's own x86 emitter, which needs no external
tool. An explicit `device` argument wins, then DEV in the environment. Code that imports the engine's
tinygrad modules without calling configure() (tests, benchmarks) gets the same defaults
(`ensure_configured`, called by those modules before they import tinygrad).
"""

from __future__ import annotations

import ctypes.util
import os
import re
import shutil
import sys

_LLVM_NAMES = ("LLVM", "LLVM-21", "LLVM-20", "LLVM-19", "LLVM-18", "LLVM-17", "LLVM-16", "LLVM-15", "LLVM-14")


def _first_llvm_major() -> int | None:
    """Major version of the libLLVM tinygrad would load (it takes the first name that resolves)."""
    for name in _LLVM_NAMES:
        found = ctypes.util.find_library(name)
        if found:
            m = re.search(r"LLVM-?(\d+)|\.so\.(\d+)", found)
            return int(next(g for g in m.groups() if g)) if m else None
    return None


def pick_default_device() -> str:
    major = _first_llvm_major()
    if major is not None and major >= 16:
        return "CPU:LLVM"
    if shutil.which("clang"):
        return "CPU"
    return "CPU:X86"


_configured = False


def configure(device: str | None = None, kernel_cache_dir=None) -> str:
    """Choose the backend (`device`, else DEV, else the fastest that works) and, when given, keep compiled
    kernels in `kernel_cache_dir`/kernels.db. Returns the device. Call before loading a model."""
    global _configured
    if device is not None and "tinygrad" in sys.modules and os.environ.get("DEV") != device:
        import warnings

        warnings.warn(f"tinygrad is already imported with DEV={os.environ.get('DEV')}; {device} cannot apply",
                      stacklevel=2)  # fmt: skip
    elif device is not None:
        os.environ["DEV"] = device
    chosen = configure_tinygrad_device()
    _configured = True
    if kernel_cache_dir is not None:
        use_kernel_cache(kernel_cache_dir)
    return chosen


def ensure_configured() -> None:
    """The defaults, for code that loads the engine without calling configure()."""
    if not _configured:
        configure()


def configure_tinygrad_device() -> str:
    """Set DEV (if unset) and return it; warns when tinygrad was imported first and DEV can't apply."""
    if "DEV" not in os.environ:
        os.environ["DEV"] = pick_default_device()
        if "tinygrad" in sys.modules:
            import warnings

            warnings.warn(
                "tinygrad was imported before p2pinfer.engine; its device choice stays default", stacklevel=2
            )
    return os.environ["DEV"]


def use_kernel_cache(data_dir) -> str:
    """Keep tinygrad's compiled kernels (and BEAM choices) in `data_dir`/kernels.db, so they are made once per
    machine and found by every later start (and by `p2pinfer warm`). An explicit CACHEDB env var wins."""
    import tinygrad.helpers as helpers

    if "CACHEDB" not in os.environ and helpers._db_connection is None:
        from pathlib import Path

        helpers.CACHEDB = str(Path(data_dir).expanduser().resolve() / "kernels.db")
    _open_kernel_db(helpers)
    from . import runner

    runner.CACHE_DIR = os.path.dirname(helpers.CACHEDB)  # the native runner library lives beside them
    return helpers.CACHEDB


def _open_kernel_db(helpers) -> None:
    """tinygrad's kernel cache connection, usable from any thread: engine calls are serialised by
    ShardHost, but a call abandoned by its cancelled caller finishes on its own worker thread while the
    next call runs on another (sqlite refuses a connection from a thread other than its creator's).
    The pragmas are tinygrad's own (helpers.db_connection)."""
    import contextlib
    import sqlite3

    if helpers._db_connection is not None or not helpers.CACHEDB:
        return
    os.makedirs(os.path.dirname(helpers.CACHEDB) or ".", exist_ok=True)
    conn = sqlite3.connect(helpers.CACHEDB, timeout=60, isolation_level="IMMEDIATE", check_same_thread=False)
    with contextlib.suppress(sqlite3.OperationalError):
        conn.execute("PRAGMA journal_mode=WAL").fetchone()
    conn.execute("PRAGMA synchronous=NORMAL")
    helpers._db_connection = conn
