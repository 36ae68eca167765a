# Vault (or OpenBao) policy for a consumer of one target's key (Vault Agent, External Secrets,
# a script): read the published secret, nothing else. Mount "secret", the example target's
# secret_path monitoring/watcher_1: adapt both.

path "secret/data/monitoring/watcher_1" {
  capabilities = ["read"]
}

# rotator's private state holds the pending key's secret and the keys it retires: never a
# consumer's, even if another policy of the same token grants more under secret/.
path "secret/data/rotator/*" {
  capabilities = ["deny"]
}
