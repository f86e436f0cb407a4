#!/bin/sh
# Run by Dovecot's script service (90-triaged-imapsieve.conf) as the triaged
# user: $1 the label, $2 the IMAP user, the message on stdin. A non-zero
# exit (65 bad input, 75 store failure) is logged by Dovecot; the user's
# move itself always succeeds.
exec /usr/local/bin/triaged feedback --config /etc/triaged/triaged.toml --label "$1" --user "$2"
