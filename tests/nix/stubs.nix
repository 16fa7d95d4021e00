# Stand-ins for the NixOS options nix/module.nix sets, declared with whichever lib evaluates it
# (tests/nix/lib.nix, or nixpkgs' lib when NIXPKGS_LIB is set). Only the sub-options the module
# uses are declared, so a typo in the module fails here as it would on NixOS.
{ lib, ... }:

let
  inherit (lib) mkOption types;
  # A unit setting: what NixOS' unitOption accepts, near enough.
  unitValue = types.either (types.either types.bool types.int) (types.either types.str (types.listOf types.str));
in
{
  options = {
    assertions = mkOption {
      type = types.listOf types.unspecified;
      default = [ ];
    };
    warnings = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };

    networking.firewall = {
      allowedTCPPorts = mkOption {
        type = types.listOf types.port;
        default = [ ];
      };
      allowedUDPPorts = mkOption {
        type = types.listOf types.port;
        default = [ ];
      };
    };

    users.users = mkOption {
      default = { };
      type = types.attrsOf (types.submodule {
        options = {
          isSystemUser = mkOption { type = types.bool; default = false; };
          group = mkOption { type = types.str; default = ""; };
          description = mkOption { type = types.str; default = ""; };
        };
      });
    };
    users.groups = mkOption {
      default = { };
      type = types.attrsOf (types.submodule { options = { }; });
    };

    systemd.tmpfiles.rules = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };

    systemd.services = mkOption {
      default = { };
      type = types.attrsOf (types.submodule {
        options = {
          description = mkOption { type = types.str; default = ""; };
          wantedBy = mkOption { type = types.listOf types.str; default = [ ]; };
          wants = mkOption { type = types.listOf types.str; default = [ ]; };
          after = mkOption { type = types.listOf types.str; default = [ ]; };
          environment = mkOption { type = types.attrsOf types.str; default = { }; };
          serviceConfig = mkOption { type = types.attrsOf unitValue; default = { }; };
          unitConfig = mkOption { type = types.attrsOf unitValue; default = { }; };
        };
      });
    };
  };
}
