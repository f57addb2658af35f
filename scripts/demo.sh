#!/usr/bin/env bash
# A tour of vmorch on one machine: a local cluster of 2 hosts, a real guest imported into the
# image catalog and launched from it (with cloud-init), then the race libvirt leaves undefined --
# one process changes a VM's memory while another kills it, at the same moment -- and how
# vmorch turns it into a defined order.
# Everything lives in a fresh temporary VMORCH_HOME that is deleted at the end, always.
# It runs scripts/install.sh first: on a fresh Debian 12, as root, 'bash scripts/demo.sh' is all it takes.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh  # everything the demo needs (cheap when already done)
VMORCH="$PWD/.venv/bin/vmorch"
PY="$PWD/.venv/bin/python"
[ -x "$VMORCH" ] || { echo "demo.sh: $VMORCH not found after scripts/install.sh" >&2; exit 1; }

# The demo's own cluster, whatever this shell points at.
unset VMORCH_REDIS_URL VMORCH_NAMESPACE
# An empty home: 'vmorch up' marks it as its own, so 'down --purge' may delete it.
VMORCH_HOME=$(mktemp -d "${TMPDIR:-/tmp}/vmorch-demo.XXXXXX")
export VMORCH_HOME
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vmorch-demo-work.XXXXXX")  # the demo's own scratch files

http_pid=
cleanup() {
    # Stops whatever is still running and deletes the home; a no-op after a clean teardown.
    [ -z "$http_pid" ] || kill "$http_pid" 2>/dev/null || true
    if [ -d "$VMORCH_HOME" ]; then
        "$VMORCH" down --purge || echo "demo.sh: 'vmorch down --purge' failed; VMORCH_HOME=$VMORCH_HOME" >&2
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

step=0
header() {
    step=$((step + 1))
    printf '\n== %d. %s\n' "$step" "$*"
}
run() {
    printf '$ vmorch %s\n' "$*"
    "$VMORCH" "$@"
}

header "Start a local cluster: Redis and 2 host workers (embedded QEMU), home $VMORCH_HOME"
run up --detach

header "The hosts"
run host list

header "Import the test guest into the image catalog, on both hosts (one job per host)"
# A small Linux guest built from Debian packages (cached after the first build), served over HTTP
# from this machine's loopback: each host's worker fetches it into its own image store.
guest=$("$PY" -m orchestrator.localcluster.guestimage)
mkdir -p "$WORK/served"
cp "$guest" "$WORK/served/guest.qcow2"
"$PY" -u -m http.server --bind 127.0.0.1 --directory "$WORK/served" 0 >"$WORK/http.log" 2>&1 &
http_pid=$!
until port=$(sed -n 's/.*port \([0-9]*\).*/\1/p' "$WORK/http.log" | head -1) && [ -n "$port" ]; do
    kill -0 "$http_pid" 2>/dev/null || { cat "$WORK/http.log" >&2; exit 1; }
    sleep 0.1
done
run image import guest "http://127.0.0.1:$port/guest.qcow2" --sha256 "$(sha256sum "$guest" | cut -d' ' -f1)" --wait
kill "$http_pid"
http_pid=
run image list

header "A network for them: one L2 segment across the hosts, with DHCP (no NAT: nothing leaves this machine)"
run net create lan --subnet 10.42.0.0/24
run net list

header "Launch three VMs from the catalog image (placed across the hosts), with cloud-init, on the network"
printf '#cloud-config\nwrite_files:\n  - path: /etc/motd\n    content: "hello from vmorch"\n' >"$WORK/user-data"
run vm launch 'demo[1-3]' --image guest --disk 1 --memory 192 --cloud-init "$WORK/user-data" --net lan --wait
run vm list

header "Into a guest: its serial console, then a command run through its guest agent (an ordered job)"
# The guests boot under software emulation here: exec waits for demo2's agent (up to --timeout).
run vm exec demo2 --timeout 180 -- cat /mnt/cidata/meta-data
run vm log demo2 --tail 5
run vm show demo2
demo3_ip=
for _ in $(seq 1 60); do  # its DHCP lease, as its guest agent reports it (bounded: 60 tries, 1 s apart)
    demo3_ip=$("$VMORCH" --json vm show demo3 | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["nics"][0]["ip"] or "")')
    [ -n "$demo3_ip" ] && break
    sleep 1
done
header "demo2 pings demo3 over the network (placement may have put them on different hosts)"
run vm exec demo2 --timeout 60 -- ping -c 3 -W 2 "${demo3_ip:-10.42.0.254}" || echo "(the ping failed: see above)"

header "Change demo1's memory and kill demo1 at the same moment, from two processes"
# Both submitters open the gate (a fifo) while this shell holds it open for writing, say
# they are ready, and block reading it. Closing our end gives both EOF at the same instant.
gate="$WORK/gate"
mkfifo "$gate"
exec 3<>"$gate"
racer() {  # racer NAME VMORCH-ARGS...: wait at the gate, then submit; the job's JSON goes to NAME.json
    local name=$1
    shift
    (
        exec 3>&- 4<"$gate"
        touch "$WORK/$name.ready"
        cat <&4 >/dev/null
        exec "$VMORCH" --json "$@" >"$WORK/$name.json"
    ) &
}
racer set vm set demo1 --memory 160
set_pid=$!
racer kill vm kill demo1
kill_pid=$!
until [ -e "$WORK/set.ready" ] && [ -e "$WORK/kill.ready" ]; do sleep 0.01; done
echo "$ vmorch --json vm set demo1 --memory 160 &"
echo "$ vmorch --json vm kill demo1 &"
exec 3>&-
wait "$set_pid"
wait "$kill_pid"

job_id() {
    "$PY" -c 'import json, sys
job = json.load(open(sys.argv[1]))
print((job[0] if isinstance(job, list) else job)["id"])' "$1"
}
set_id=$(job_id "$WORK/set.json")
kill_id=$(job_id "$WORK/kill.json")
echo "accepted: job $set_id (set memory) and job $kill_id (kill)"

header "Wait for both jobs"
run job wait "$set_id" "$kill_id" || echo "(a job did not succeed: see its error below)"
run job list --vm demo1
run vm show demo1

header "What happened"
"$VMORCH" --json job show "$set_id" >"$WORK/set.final.json"
"$VMORCH" --json job show "$kill_id" >"$WORK/kill.final.json"
"$VMORCH" --json vm show demo1 >"$WORK/vm.json"
"$PY" - "$WORK/set.final.json" "$WORK/kill.final.json" "$WORK/vm.json" <<'EOF'
import json
import sys
from datetime import datetime

jobs = sorted((json.load(open(path)) for path in sys.argv[1:3]), key=lambda job: job["seq"])
vm = json.load(open(sys.argv[3]))
first, second = jobs


def when(job, key):
    return datetime.fromisoformat(job[key]) if job[key] else None


def name(job):
    return f"job {job['id']} ({job['op']}, seq {job['seq']}, {job['state']})"


print("Both requests arrived together. vmorch gave each a place in demo1's order when it")
print(f"accepted it: first {name(first)}, then {name(second)}.")
first_end, second_start = when(first, "finished_at"), when(second, "started_at")
if first_end and second_start:
    gap = (second_start - first_end).total_seconds() * 1000
    verdict = "after" if second_start >= first_end else "BEFORE"
    print(f"Job {second['id']} started {second_start:%H:%M:%S.%f}, {verdict} job {first['id']} finished "
          f"({first_end:%H:%M:%S.%f}, {gap:+.0f} ms): one operation at a time on a VM, in that order.")
print(f"demo1 is now {vm['state']} with {vm['memory_mib']} MiB: what running them in that order gives,")
print("every time -- not whatever libvirt's threads and QEMU happen to do with two calls at once.")
EOF

header "All jobs of this demo"
run job list

header "Tear down"
run vm delete 'demo[1-3]' --wait
run net delete lan
run image remove guest --wait
run down --purge
