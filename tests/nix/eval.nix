# Evaluate nix/module.nix with the stand-in NixOS options and a test configuration, and return
# what the tests check as JSON-friendly data:
#   nix-instantiate --eval --strict --json tests/nix/eval.nix \
#     --argstr configFile /path/to/config.nix [--argstr libPath /path/to/nixpkgs/lib]
# configFile holds a NixOS-style module (a function or an attribute set).
{ configFile, libPath ? "" }:

let
  lib = if libPath == "" then import ./lib.nix else import libPath;
  # The module only needs pkgs for its default package, which the tests always override.
  pkgs = { callPackage = _: _: throw "tests must set services.p2pinfer.package"; };
  result = lib.evalModules {
    modules = [ ./stubs.nix ../../nix/module.nix configFile ];
    specialArgs = { inherit pkgs; };
  };
  cfg = result.config;
  # nixpkgs' submodule values carry `_module` (with functions, which JSON cannot hold).
  plain = v: removeAttrs v [ "_module" ];
in
{
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) cfg.assertions);
  service = if cfg.systemd.services ? p2pinfer then plain cfg.systemd.services.p2pinfer else null;
  firewall = plain cfg.networking.firewall;
  users = builtins.mapAttrs (_: plain) cfg.users.users;
  groups = builtins.attrNames cfg.users.groups;
  tmpfiles = cfg.systemd.tmpfiles.rules;
}
