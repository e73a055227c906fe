getent group panoptic-sync >/dev/null || groupadd -r panoptic-sync
getent passwd panoptic-sync >/dev/null || useradd -r -g panoptic-sync -d /var/lib/panoptic-sync -s /sbin/nologin -c "panoptic-sync artifact agent" panoptic-sync
install -d -m 0700 -o panoptic-sync -g panoptic-sync /var/lib/panoptic-sync
chgrp panoptic-sync /etc/panoptic-sync/config.toml || :
systemctl daemon-reload >/dev/null 2>&1 || :
