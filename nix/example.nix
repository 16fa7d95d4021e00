# An example NixOS configuration of one device (the README's; tests evaluate it). Put the same
# cluster secret on every device, e.g. `openssl rand -hex 32`, copied to /run/keys by your secret
# tool (agenix, sops-nix) or by hand, never into the Nix store.
{
  services.p2pinfer = {
    enable = true;
    httpHost = "0.0.0.0"; # serve the LAN; needs an API key
    httpPort = 52415;
    p2pPort = 52416;
    apiKeyFile = "/run/keys/p2pinfer-api-key";
    clusterSecretFile = "/run/keys/p2pinfer-cluster-secret";
    modelsDir = "/srv/models"; # GGUF files or Hugging Face model directories
    memoryLimit = "6G";
    # mDNS finds the peers of this LAN; list peers on other subnets here.
    bootstrapPeers = [ ];
    openFirewall = true; # 52416/tcp, 5353/udp and, as httpHost is not loopback, 52415/tcp
    extraArgs = [ "--log-level" "INFO" ];
  };
}
