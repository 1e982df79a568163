# $1: the agent's answer (unused: the task is finished, not answered)
test -d /root/backup && grep -qw done /root/backup/notes.txt
