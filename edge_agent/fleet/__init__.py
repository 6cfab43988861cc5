"""Fleet updates, run by the updater service (not on the frame path): ``index`` reads and verifies the
signed fleet index and downloads releases, ``signing`` holds the ed25519 rules, ``models_dir`` the
on-disk versions, ``update`` installs one with self-test and rollback, ``update_mqtt`` reports it, and
``publish`` is the publisher's side (``edge-agent fleet-publish``).
"""
