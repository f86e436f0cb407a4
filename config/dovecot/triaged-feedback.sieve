# imapsieve: a message was copied or moved into ${imap.mailbox}. The folder
# says the user's label; edit the names to match the site's folders and the
# model's categories (`triaged feedback --label x` lists them on an error).
require ["vnd.dovecot.pipe", "copy", "imapsieve", "environment", "variables"];

if environment :matches "imap.user" "*" { set "user" "${1}"; }

if environment :is "imap.mailbox" "Junk" {
  pipe :copy "triaged-feedback" ["spam", "${user}"];
} elsif environment :is "imap.mailbox" "INBOX" {
  pipe :copy "triaged-feedback" ["primary", "${user}"];
} elsif environment :is "imap.mailbox" "Promotions" {
  pipe :copy "triaged-feedback" ["promotions", "${user}"];
} elsif environment :is "imap.mailbox" "Updates" {
  pipe :copy "triaged-feedback" ["updates", "${user}"];
} elsif environment :is "imap.mailbox" "Forums" {
  pipe :copy "triaged-feedback" ["forums", "${user}"];
}
