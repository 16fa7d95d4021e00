# Python packages p2pinfer needs that nixpkgs does not carry (or not at the pinned version).
# Wheels from PyPI: py3-none-any, so no build. Hashes checked against PyPI's files.
{ python3Packages }:

let
  inherit (python3Packages) buildPythonPackage fetchPypi;
  # Dependencies by their PyPI names, taken from nixpkgs when it has them; a missing one is left
  # out (for libp2p those are optional transports and discovery we do not use, e.g. UPnP).
  fromNixpkgs = names: builtins.filter (p: p != null) (map (n: python3Packages.${n} or null) names);
in
rec {
  rpcudp = buildPythonPackage rec {
    pname = "rpcudp";
    version = "5.0.1";
    format = "wheel";
    src = fetchPypi {
      inherit pname version format;
      dist = "py3";
      python = "py3";
      hash = "sha256-i/fPHK7Wh6y78qN7Z6krAtEJSDotoo+hPMqTue6HO5o=";
    };
    dependencies = fromNixpkgs [ "u-msgpack-python" ];
  };

  libp2p = buildPythonPackage rec {
    pname = "libp2p";
    version = "0.8.1";
    format = "wheel";
    src = fetchPypi {
      inherit pname version format;
      dist = "py3";
      python = "py3";
      hash = "sha256-PVPaogpqeJhMm07RZU13F1exhygvkDdtcVbCtngoswg=";
    };
    dependencies = [ rpcudp ] ++ fromNixpkgs [
      "aioquic" "anyio" "base58" "cbor2" "coincurve" "cryptography" "fastecdsa" "grpcio" "httpx"
      "lru-dict" "miniupnpc" "multiaddr" "mypy-protobuf" "noiseprotocol" "protobuf" "pycryptodome"
      "py-multibase" "py-multicodec" "py-multihash" "py-cid" "pynacl" "prometheus-client"
      "requests" "trio" "trio-typing" "trio-websocket"
    ];
    # libp2p pins exact versions (coincurve, fastecdsa) that nixpkgs moves past; and see above.
    dontCheckRuntimeDeps = true;
    pythonImportsCheck = [ "libp2p" ];
  };
}
