#!/bin/bash
D=/var/tmp/bon36
umount $D/mnt 2>/dev/null
losetup -d $(cat $D/dev) 2>/dev/null; sleep 0.5
fusermount3 -u $D/fuse 2>/dev/null
sleep 0.5
kill $(cat $D/server.pid) 2>/dev/null
for i in $(seq 50); do kill -0 $(cat $D/server.pid) 2>/dev/null || break; sleep 0.1; done
rm -f $D/img.raw
echo down
