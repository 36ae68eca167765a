# Vault (or OpenBao) policy for rotator's own token, AppRole or Kubernetes role.
# Written for the KV v2 mount "secret", vault.state_path "rotator" and the example target's
# secret_path monitoring/watcher_1: change "secret/" to your vault.mount, and list each
# target's secret_path. tests/deploy/test_vault_policies.py runs rotator with exactly this.
# Nothing here allows deleting or destroying a secret, or reading anything else.

# Each target's published secret (consumers read it): read it, and write new versions with
# check-and-set. One stanza per target (or one glob if they share a prefix).
path "secret/data/monitoring/watcher_1" {
  capabilities = ["create", "read", "update"]
}

# rotator's private state (<state_path>/targets/<target>) and per-target lease locks
# (<state_path>/locks/<target>). rotator reads the latest version only (no metadata reads).
path "secret/data/rotator/*" {
  capabilities = ["create", "read", "update"]
}

# Which targets have a state (at start and after a reload): a target removed from the config
# whose state still tracks keys is warned of, and a renamed one carries its state on. Without it
# rotator logs unconfigured_check_failed once and goes on.
path "secret/metadata/rotator/targets/" {
  capabilities = ["list"]
}

# At start: the mount's KV settings (delete_version_after, max_versions), warned of when they
# work against rotator. Without it the check is skipped.
path "secret/config" {
  capabilities = ["read"]
}

# At start and in the readiness probe: "is this mount KV version 2?".
path "sys/internal/ui/mounts/secret" {
  capabilities = ["read"]
}

# Its own token: the readiness probe looks it up; renewal keeps a renewable token alive.
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}
