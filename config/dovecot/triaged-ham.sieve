# imapsieve: a message left Junk for ${imap.mailbox}. Folders that have a
# label in triaged-feedback.sieve are handled there (a category says "not
# spam" already); Trash says nothing. Anything else: "ham".
require ["vnd.dovecot.pipe", "copy", "imapsieve", "environment", "variables"];

if environment :is "imap.mailbox" ["Junk", "Trash", "INBOX", "Promotions", "Updates", "Forums"] {
  stop;
}
if environment :matches "imap.user" "*" { set "user" "${1}"; }
pipe :copy "triaged-feedback" ["ham", "${user}"];
