# NixOS module: services.p2pinfer runs the p2pinfer agent as a hardened systemd service.
# Secrets (cluster secret, API key) are read by systemd from their paths at start and handed to the
# agent as credentials: they never enter the Nix store, and an assertion refuses store paths.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.p2pinfer;
  inherit (lib) mkOption mkIf types;

  isLoopback = host: host == "localhost" || host == "::1" || lib.hasPrefix "127." host;
  inStore = p: p != null && lib.hasPrefix "${builtins.storeDir}/" (toString p);
  # StateDirectory= only manages directories below /var/lib; any other dataDir is made by tmpfiles.
  useStateDirectory = lib.hasPrefix "/var/lib/" cfg.dataDir;

  # One ExecStart argument: shell-quoted (systemd understands that quoting) with % doubled, so
  # that a user's value is never read as a systemd specifier.
  arg = a: lib.escapeShellArg (builtins.replaceStrings [ "%" ] [ "%%" ] (toString a));

  args =
    [
      "run"
      "--data-dir" cfg.dataDir
      "--listen" "/ip4/0.0.0.0/tcp/${toString cfg.p2pPort}"
      "--http-host" cfg.httpHost
      "--http-port" (toString cfg.httpPort)
    ]
    ++ lib.optionals (cfg.modelsDir != null) [ "--models-dir" cfg.modelsDir ]
    ++ lib.concatMap (peer: [ "--bootstrap" peer ]) cfg.bootstrapPeers
    ++ lib.optionals (cfg.memoryLimit != null) [ "--memory-limit" cfg.memoryLimit ]
    ++ cfg.extraArgs;

  # %d is the service's credentials directory: these two stay unescaped on purpose.
  credentialArgs =
    lib.optional (cfg.clusterSecretFile != null) "--cluster-secret-file %d/cluster-secret"
    ++ lib.optional (cfg.apiKeyFile != null) "--api-key-file %d/api-key";
in
{
  options.services.p2pinfer = {
    enable = lib.mkEnableOption "the p2pinfer agent, which pools the devices of a LAN into one LLM server";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./nix/package.nix { }";
      description = "The p2pinfer package to run.";
    };

    httpHost = mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "0.0.0.0";
      description = "Address of the OpenAI-compatible HTTP API. Anything but loopback needs apiKeyFile.";
    };

    httpPort = mkOption {
      type = types.port;
      default = 52415;
      description = "Port of the HTTP API.";
    };

    p2pPort = mkOption {
      type = types.port;
      default = 52416;
      description = "TCP port the agent listens on for its peers (libp2p).";
    };

    dataDir = mkOption {
      type = types.path;
      default = "/var/lib/p2pinfer";
      description = "Directory holding the agent's key, cluster secret and state.";
    };

    modelsDir = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/srv/models";
      description = "Directory with model files (GGUF, safetensors), bound read-only into the service.";
    };

    bootstrapPeers = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "/ip4/192.168.1.10/tcp/52416/p2p/12D3KooW..." ];
      description = "Multiaddrs of peers to dial at start, besides those found by mDNS.";
    };

    clusterSecretFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/keys/p2pinfer-cluster-secret";
      description = ''
        File holding the cluster secret (64 hex characters), the same on every device of the
        cluster. Read by systemd at start and passed as a credential; must not be in the Nix store.
        When null, the agent creates a secret in dataDir on first start.
      '';
    };

    apiKeyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/keys/p2pinfer-api-key";
      description = "File holding the HTTP API key, passed as a credential; must not be in the Nix store.";
    };

    memoryLimit = mkOption {
      type = types.nullOr (types.strMatching "[0-9]+([.][0-9]+)?[KMGTkmgt]?");
      default = null;
      example = "4G";
      description = "Memory the agent offers for model layers (4G, 512M or bytes); null lets it measure.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Open the p2p TCP port and UDP 5353 (mDNS) in the firewall, and the HTTP port when
        httpHost is not a loopback address.
      '';
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--log-level" "debug" "--no-compute" ];
      description = "Further arguments for `p2pinfer run`.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = !(inStore cfg.clusterSecretFile);
        message = "services.p2pinfer.clusterSecretFile must not be in the Nix store (it is world-readable there); use a path like /run/keys/p2pinfer-cluster-secret.";
      }
      {
        assertion = !(inStore cfg.apiKeyFile);
        message = "services.p2pinfer.apiKeyFile must not be in the Nix store (it is world-readable there); use a path like /run/keys/p2pinfer-api-key.";
      }
      {
        assertion = isLoopback cfg.httpHost || cfg.apiKeyFile != null;
        message = "services.p2pinfer.apiKeyFile must be set when httpHost (${cfg.httpHost}) is not a loopback address.";
      }
    ];

    # A dedicated user (not DynamicUser) so that a dataDir outside /var/lib keeps a stable owner.
    users.users.p2pinfer = {
      isSystemUser = true;
      group = "p2pinfer";
      description = "p2pinfer agent";
    };
    users.groups.p2pinfer = { };

    systemd.tmpfiles.rules = lib.optional (!useStateDirectory) "d ${cfg.dataDir} 0700 p2pinfer p2pinfer - -";

    networking.firewall = mkIf cfg.openFirewall {
      allowedTCPPorts = [ cfg.p2pPort ] ++ lib.optional (!isLoopback cfg.httpHost) cfg.httpPort;
      allowedUDPPorts = [ 5353 ];
    };

    systemd.services.p2pinfer = {
      description = "p2pinfer agent: pools the devices of a LAN into one LLM server";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      environment = {
        HOME = cfg.dataDir;
        # tinygrad keeps its compiled-kernel cache under XDG_CACHE_HOME; everything else is read-only.
        XDG_CACHE_HOME = "/var/cache/p2pinfer";
      };

      serviceConfig =
        {
          Type = "exec";
          ExecStart = lib.concatStringsSep " " ([ "${cfg.package}/bin/p2pinfer" ] ++ map arg args ++ credentialArgs);
          LoadCredential =
            lib.optional (cfg.clusterSecretFile != null) "cluster-secret:${toString cfg.clusterSecretFile}"
            ++ lib.optional (cfg.apiKeyFile != null) "api-key:${toString cfg.apiKeyFile}";
          # SIGTERM (the default) makes the agent send its signed leave and exit 0.
          TimeoutStopSec = "30s";
          Restart = "on-failure";
          RestartSec = "5s";

          User = "p2pinfer";
          Group = "p2pinfer";
          CacheDirectory = "p2pinfer";
          CacheDirectoryMode = "0700";
          WorkingDirectory = cfg.dataDir;
          UMask = "0077";

          # Hardening; the same set as bootstrap/p2pinfer.service.in. Not set on purpose:
          # MemoryDenyWriteExecute (tinygrad runs the kernels it compiles from W+X pages),
          # ProcSubset=pid (the agent reads /proc/meminfo and /proc/cpuinfo), PrivateNetwork and
          # IPAddressDeny (peers are anywhere on the LAN; mDNS uses multicast).
          NoNewPrivileges = true;
          CapabilityBoundingSet = "";
          AmbientCapabilities = "";
          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          PrivateUsers = true;
          PrivateIPC = true;
          PrivateMounts = true;
          ProtectHostname = true;
          ProtectClock = true;
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectKernelLogs = true;
          ProtectControlGroups = true;
          ProtectProc = "invisible";
          RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" "AF_NETLINK" ];
          RestrictNamespaces = true;
          RestrictRealtime = true;
          RestrictSUIDSGID = true;
          LockPersonality = true;
          RemoveIPC = true;
          KeyringMode = "private";
          DevicePolicy = "closed";
          SystemCallArchitectures = "native";
          SystemCallFilter = [ "@system-service" "~@privileged" ];
          SystemCallErrorNumber = "EPERM";
        }
        // lib.optionalAttrs useStateDirectory {
          StateDirectory = lib.removePrefix "/var/lib/" cfg.dataDir;
          StateDirectoryMode = "0700";
        }
        // lib.optionalAttrs (!useStateDirectory) {
          ReadWritePaths = [ cfg.dataDir ];
        }
        // lib.optionalAttrs (cfg.modelsDir != null) {
          # '-': a missing directory does not stop the service (the agent then reports no models there).
          BindReadOnlyPaths = [ "-${builtins.replaceStrings [ "%" ] [ "%%" ] (toString cfg.modelsDir)}" ];
        };
    };
  };
}
