{
  description = "p2pinfer: pool the devices of a LAN into one LLM server, peer to peer";

  # No flake.lock is committed (nixpkgs could not be reached where this was written): the first
  # `nix flake lock` (or any nix build/run) on your machine pins nixpkgs; commit that lock file.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs: rec {
        p2pinfer = pkgs.callPackage ./nix/package.nix { };
        default = p2pinfer;
      });

      apps = forAllSystems (pkgs: rec {
        p2pinfer = {
          type = "app";
          program = "${self.packages.${pkgs.stdenv.hostPlatform.system}.p2pinfer}/bin/p2pinfer";
        };
        default = p2pinfer;
      });

      # services.p2pinfer; its package defaults to this flake's build for the host's system.
      nixosModules.default = { pkgs, lib, ... }: {
        imports = [ ./nix/module.nix ];
        services.p2pinfer.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.p2pinfer;
      };
      nixosModules.p2pinfer = self.nixosModules.default;

      # A shell to hack on p2pinfer: Python with pip and a venv, clang for tinygrad's CPU kernels,
      # and the tools the deploy tests use.
      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            pkgs.python311
            pkgs.python311Packages.pip
            pkgs.clang
            pkgs.gmp
            pkgs.shellcheck
            pkgs.ruff
            pkgs.systemd
            pkgs.nix
          ];
          shellHook = ''
            if [ ! -d .venv ]; then python -m venv .venv && .venv/bin/pip install -e '.[test]'; fi
            source .venv/bin/activate
          '';
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixpkgs-fmt);
    };
}
