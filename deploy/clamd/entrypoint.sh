#!/bin/sh
# clamd's container: fetch the signatures once if the volume has none (a DOWNLOAD of ~300 MB from
# database.clamav.net; clamd cannot start without a database), keep them fresh with freshclam's
# daemon (12 checks a day), and run clamd in the foreground as PID 1's child.
set -eu
if ! ls /var/lib/clamav/*.cvd /var/lib/clamav/*.cld >/dev/null 2>&1; then
    echo "clamd-entrypoint: no signatures in /var/lib/clamav: running freshclam (downloads them)" >&2
    freshclam --foreground --stdout
fi
freshclam --daemon
exec clamd --foreground -c /etc/clamav/clamd.conf
