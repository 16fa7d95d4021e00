# p2pinfer as a Nix package, built from this tree.
#   nix build .#p2pinfer      (flake)      or      pkgs.callPackage ./nix/package.nix { }
{ lib, python3Packages }:

let
  deps = import ./python-deps.nix { inherit python3Packages; };
  # The version lives in p2pinfer/__init__.py (pyproject.toml reads it from there too).
  version = builtins.head
    (builtins.match ".*__version__ = \"([^\"]+)\".*" (builtins.readFile ../p2pinfer/__init__.py));
in
python3Packages.buildPythonApplication {
  pname = "p2pinfer";
  inherit version;
  pyproject = true;

  # Only what the wheel needs, so that editing tests or docs does not rebuild the package.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [ ../pyproject.toml (lib.fileset.maybeMissing ../README.md) ../p2pinfer ];
  };

  build-system = [ python3Packages.setuptools ];

  dependencies = (with python3Packages; [
    trio msgpack numpy tinygrad zeroconf cryptography hypercorn starlette gguf tokenizers jinja2
    safetensors multiaddr rich prometheus-client pydantic
  ]) ++ [ deps.libp2p ];

  # pyproject pins tinygrad and libp2p exactly; nixpkgs' tinygrad (which also patches in the path
  # of clang for its CPU kernels) may differ by a minor version.
  pythonRelaxDeps = true;

  # The test suite starts real agents on the network; CI runs it outside the sandbox.
  doCheck = false;
  pythonImportsCheck = [ "p2pinfer" ];

  meta = {
    description = "Pool the devices on a network into one LLM server: peer-to-peer, no master";
    license = lib.licenses.asl20;
    mainProgram = "p2pinfer";
    platforms = lib.platforms.linux ++ lib.platforms.darwin;
  };
}
