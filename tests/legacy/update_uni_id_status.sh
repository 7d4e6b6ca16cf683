#!/usr/bin/env bash
# The registry writer of the old in-house wrapper scripts, as it is still used on servers:
# read, change one record, write back with open(F, 'w') -- no lock, no temp file, so for a few
# milliseconds the file is empty or half written. Kept verbatim (tests run it against gpu-compete).
#
# update_uni_id_status FILE ID PID STATE      a record {pid, state, retry_count}
# update_uni_id_status FILE ID PID bare       the oldest form: "ID": PID
update_uni_id_status() {
  local F=$1 ID=$2 PID=$3 STATE=$4
  if [ "$STATE" = bare ]; then
    python3 -c "
import json
try:
    with open('$F') as f:
        c = f.read().strip(); data = json.loads(c) if c else {}
except Exception:
    data = {}
data['$ID'] = $PID
with open('$F', 'w') as f: json.dump(data, f, indent=2)
"
  else
    python3 -c "
import json
try:
    with open('$F') as f:
        c = f.read().strip(); data = json.loads(c) if c else {}
except Exception:
    data = {}
r = data.setdefault('$ID', {}); r['pid'] = $PID; r['state'] = '$STATE'
r['retry_count'] = r.get('retry_count', 0)
with open('$F', 'w') as f: json.dump(data, f, indent=2)
"
  fi
}

# As a script: legacy_loop FILE COUNT PREFIX -- write COUNT records PREFIX-0..COUNT-1, one by one.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  F=$1 COUNT=$2 PREFIX=${3:-legacy}
  for i in $(seq 0 $((COUNT - 1))); do
    update_uni_id_status "$F" "$PREFIX-$i" $$ running
  done
fi
