import pytest

from tests.harness import AgentProcess


@pytest.fixture
def agents(tmp_path):
    """Start agents with agents(name, *args, secret_hex=...); all are stopped after the test."""
    started: list[AgentProcess] = []

    def start(name: str, *args: str, **kw) -> AgentProcess:
        a = AgentProcess(tmp_path, name, *args, **kw).start()
        started.append(a)
        return a

    yield start
    for a in started:
        a.stop()
