#!/usr/bin/env bash
# The package, end to end, on three hosts: three containers with systemd as PID 1 on a private
# Docker network, the .deb installed with apt, each host configured only by editing
# /etc/chatraftd/chatraftd.toml, the cluster formed by `systemctl start` through /join.
#
#   packaging/test-e2e.sh
#
# Checks, in order: the man pages lint clean; the package builds and lintian finds no error;
# the unit passes `systemd-analyze verify` and its `security` score is printed; a first
# install neither enables nor starts the node; the six-message scenario shows the same order
# on all three hosts; `systemctl reload` applies log.level and names a restart-only key;
# `systemctl restart` of a follower, then of the leader, under a running writer loses no
# acknowledged message and leaves all three identical; an upgrade to a higher version keeps
# data and config edits and restarts the running node; `systemctl stop` is clean within 10 s;
# remove keeps config and data, purge removes the config and keeps the data. Then
# docker-compose.yml brings up its three nodes (on free loopback ports) and shows the same
# six messages in the same order on each.
#
# Needs root, docker (with compose), debootstrap, cargo-deb, lintian, mandoc, man-db, ss
# (iproute2), curl and jq.
# CHATRAFTD_E2E_BASE_IMAGE=TAG reuses an existing base image (packaging/make-base-image.sh)
# instead of making one; that image is then left alone.
# Every container, network, image tag and file it makes is removed at exit, even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
run_id="e2e$$"
net="chatraftd-$run_id"
base_image=${CHATRAFTD_E2E_BASE_IMAGE:-}
own_base=""
hosts=(h1 h2 h3)
work=$(mktemp -d /tmp/chatraftd-e2e.XXXXXX)
writer_pid=""
compose_up=""
compose_image="chatraftd-e2e:$run_id"
compose_deb=""
if docker compose version >/dev/null 2>&1; then
    compose=(docker compose -p "chatraftd$run_id" -f docker-compose.yml)
else
    compose=(docker-compose -p "chatraftd$run_id" -f docker-compose.yml)
fi

log() { printf '%s [%4ss] %s\n' "$(date +%T)" "$(($(date +%s) - started))" "$*"; }
fail() {
    log "FAIL: $*"
    exit 1
}

cleanup() {
    local rc=$?
    set +e
    [ -n "$writer_pid" ] && kill "$writer_pid" 2>/dev/null && wait "$writer_pid" 2>/dev/null
    if [ "$rc" != 0 ]; then
        for h in "${hosts[@]}"; do
            if docker inspect "$run_id-$h" >/dev/null 2>&1; then
                echo "---- journal of $h (last 40 lines)"
                docker exec "$run_id-$h" journalctl -u chatraftd --no-pager -n 40 2>&1
            fi
        done
    fi
    if [ -n "$compose_up" ]; then
        [ "$rc" != 0 ] && "${compose[@]}" logs --no-color --tail 30 2>&1
        "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1
    fi
    docker rmi "$compose_image" >/dev/null 2>&1
    rm -f "$compose_deb"
    for h in "${hosts[@]}"; do docker rm -f "$run_id-$h" >/dev/null 2>&1; done
    docker network rm "$net" >/dev/null 2>&1
    [ -n "$own_base" ] && docker rmi "$own_base" >/dev/null 2>&1
    rm -rf "$work"
    log "end (exit $rc)"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Runs a command on host $1.
on() {
    local h=$1
    shift
    docker exec "$run_id-$h" "$@"
}

# Polls `$@` every 200 ms until it succeeds or $1 seconds pass.
wait_for() {
    local secs=$1
    shift
    local deadline=$(($(date +%s) + secs))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

ip_of() { docker inspect -f "{{(index .NetworkSettings.Networks \"$net\").IPAddress}}" "$run_id-$1"; }
api() { curl -sf --max-time 10 "http://${ip[$1]}:8081$2"; }
status() { api "$1" /api/v1/status; }

# --- static checks -----------------------------------------------------------------------
log "man pages: mandoc -T lint -W warning, man --warnings"
mandoc -T lint -W warning man/chatraftd.8 man/chatraftd.toml.5
for page in man/chatraftd.8 man/chatraftd.toml.5; do
    warnings=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -l "$page" 2>&1 >/dev/null)
    [ -z "$warnings" ] || fail "man --warnings $page: $warnings"
done

log "building the package (cargo deb --locked)"
cargo deb --locked -o "$work/" >"$work/cargo-deb.log" 2>&1 || {
    tail -n 40 "$work/cargo-deb.log"
    fail "cargo deb"
}
deb=$(ls "$work"/chatraftd_*_amd64.deb)
version=$(dpkg-deb -f "$deb" Version)
log "built $(basename "$deb")"
# The upgrade: the same build repackaged under a higher version.
cargo deb --locked --no-build --deb-revision 99 -o "$work/upgrade/" >"$work/cargo-deb-2.log" 2>&1 || {
    tail -n 40 "$work/cargo-deb-2.log"
    fail "cargo deb (upgrade)"
}
deb2=$(ls "$work"/upgrade/chatraftd_*_amd64.deb)
version2=$(dpkg-deb -f "$deb2" Version)
dpkg --compare-versions "$version2" gt "$version" || fail "$version2 is not above $version"

log "lintian"
lintian --fail-on error,warning --suppress-tags-from-file packaging/lintian-kept-warnings "$deb"
dpkg-deb -c "$deb" | awk '{print $6}' | grep -qx './etc/chatraftd/chatraftd.toml' || fail "no conffile"
dpkg-deb -e "$deb" "$work/control"
grep -qx /etc/chatraftd/chatraftd.toml "$work/control/conffiles" || fail "config is not a conffile"

# --- three hosts -------------------------------------------------------------------------
if [ -z "$base_image" ]; then
    base_image="chatraftd-e2e-base:$run_id"
    own_base=$base_image
    log "making the base image $base_image (debootstrap)"
    packaging/make-base-image.sh "$base_image"
fi

# A host's systemd is not under Docker's seccomp profile, which forbids the user namespace
# PrivateUsers=yes needs: lift it so the unit runs exactly as shipped. No --privileged.
cgroup_opts=(--tmpfs /run --tmpfs /run/lock --security-opt seccomp=unconfined)
if [ "$(docker info -f '{{.CgroupVersion}}' 2>/dev/null)" = 2 ]; then
    cgroup_opts+=(--cgroupns=private)
else
    cgroup_opts+=(-v /sys/fs/cgroup:/sys/fs/cgroup:ro --cgroupns=host)
fi

docker network create "$net" >/dev/null
declare -A ip
for h in "${hosts[@]}"; do
    docker run -d --name "$run_id-$h" --hostname "$h" --network "$net" "${cgroup_opts[@]}" \
        "$base_image" /lib/systemd/systemd >/dev/null
done
for h in "${hosts[@]}"; do
    wait_for 60 bash -c "docker exec $run_id-$h systemctl is-system-running | grep -Eq 'running|degraded'" ||
        fail "systemd did not come up on $h"
    ip[$h]=$(ip_of "$h")
    docker cp "$deb" "$run_id-$h:/root/"
done
log "PID 1 on the hosts: $(on h1 cat /proc/1/comm)"

log "installing the package with apt on every host"
for h in "${hosts[@]}"; do
    on "$h" apt-get install -y -q --no-install-recommends "/root/$(basename "$deb")" >"$work/apt-$h.log" 2>&1 || {
        cat "$work/apt-$h.log"
        fail "apt-get install on $h"
    }
done
on h1 getent passwd chatraftd >/dev/null || fail "no chatraftd user"
[ "$(on h1 systemctl is-active chatraftd || true)" = inactive ] || fail "a first install started the node"
[ "$(on h1 systemctl is-enabled chatraftd || true)" = disabled ] || fail "a first install enabled the node"
man_ok=$(on h1 sh -c 'test -f /usr/share/man/man8/chatraftd.8.gz && test -f /usr/share/man/man5/chatraftd.toml.5.gz && echo yes')
[ "$man_ok" = yes ] || fail "man pages not installed"

log "systemd-analyze verify"
on h1 systemd-analyze verify chatraftd.service 2>&1 | tee "$work/verify.log"
[ ! -s "$work/verify.log" ] || fail "systemd-analyze verify is not clean"
score=$(on h1 systemd-analyze security chatraftd.service --no-pager | tail -n 1)
log "systemd-analyze security: $score"

# Each host is configured only by editing its config file, plus the cluster secret every
# host shares. $1 host, $2 node id, $3 role line.
cluster_secret=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
configure() {
    local h=$1 id=$2 role=$3
    on "$h" sh -c "umask 077; printf '%s\n' '$cluster_secret' > /etc/chatraftd/cluster-secret \
        && chown chatraftd:chatraftd /etc/chatraftd/cluster-secret"
    on "$h" sed -i \
        -e "s/^node_id = .*/node_id = $id/" \
        -e "s/^${role%% =*} = .*/$role/" \
        -e "s/^listen = \"127.0.0.1:8081\"/listen = \"0.0.0.0:8081\"/" \
        -e "s/^listen = \"127.0.0.1:12001\"/listen = \"0.0.0.0:12001\"/" \
        -e "/^\[api\]/,/^\[raft\]/s/^advertise = \"\"/advertise = \"$h:8081\"/" \
        -e "/^\[raft\]/,/^\[limits\]/s/^advertise = \"\"/advertise = \"$h:12001\"/" \
        /etc/chatraftd/chatraftd.toml
    on "$h" chatraftd --check-config >/dev/null || fail "config on $h does not check"
}
configure h1 1 'bootstrap = true'
configure h2 2 'join = ["h1:8081", "h3:8081"]'
configure h3 3 'join = ["h1:8081", "h2:8081"]'
on h2 sh -c 'sed -n "/^\[api\]/,/^\[limits\]/p" /etc/chatraftd/chatraftd.toml | grep -E "^(listen|advertise)"'

# --- the cluster -------------------------------------------------------------------------
all_voters() {
    local h=$1
    [ "$(status "$h" | jq '[.members[] | select(.voter)] | length')" = 3 ] &&
        api "$h" /readyz >/dev/null
}
cluster_ready() {
    for h in "${hosts[@]}"; do all_voters "$h" || return 1; done
}
log "systemctl start chatraftd on h1, h2, h3"
for h in "${hosts[@]}"; do
    on "$h" systemctl start chatraftd || fail "systemctl start on $h"
done
wait_for 90 cluster_ready || fail "the cluster did not form"
log "cluster formed: $(status h1 | jq -c '[.members[] | {node_id, api_addr, voter}]')"
# The STATUS= line follows the metrics (at most a second behind).
status_text_current() {
    on "$1" systemctl show -p StatusText --value chatraftd | grep -Eq '^(leader|follower), term [1-9][0-9]*, leader [1-3], commit index [1-9]'
}
for h in "${hosts[@]}"; do
    wait_for 10 status_text_current "$h" || fail "no current STATUS= text on $h"
    log "$h systemd status: $(on "$h" systemctl show -p StatusText --value chatraftd)"
done
# Logs reach journald as structured entries: NODE_ID on each, TERM and ROLE where they apply.
on h2 journalctl -u chatraftd -o json --no-pager NODE_ID=2 |
    jq -e -s 'map(select(.SYSLOG_IDENTIFIER == "chatraftd" and .ROLE != null and .TERM != null)) | length > 0' >/dev/null ||
    fail "no structured journald entries with NODE_ID=2, ROLE and TERM"

# --- the six-message scenario ------------------------------------------------------------
log "six messages round-robin over the three hosts"
for i in $(seq 1 6); do
    node=$(((i % 3) + 1))
    body='{"conv_id":"general","sender":"u'$node'","payload":"msg-'$i'-from-node'$node'","vector_clock":{"u'$node'":'$i'}}'
    curl -sf --max-time 10 -X POST "http://${ip[h$node]}:8081/api/v1/message" \
        -H 'Content-Type: application/json' -d "$body" >/dev/null || fail "POST $i to h$node"
done
# Each host's stream from seq 1, read until six events arrived (at most 10 s).
has_lines() { [ "$(grep -c '^data:' "$1")" -ge "$2" ]; }
stream6() {
    local raw="$work/raw-$1" pid
    curl -sN --max-time 20 "http://${ip[$1]}:8081/api/v1/stream?conv_id=general&from=1" >"$raw" &
    pid=$!
    wait_for 10 has_lines "$raw" 6 || true
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
    grep '^data:' "$raw" >"$work/stream-$1" || true
}
for h in "${hosts[@]}"; do stream6 "$h"; done
[ "$(wc -l <"$work/stream-h1")" = 6 ] || fail "h1 streamed $(wc -l <"$work/stream-h1") of 6 messages"
cmp -s "$work/stream-h1" "$work/stream-h2" && cmp -s "$work/stream-h1" "$work/stream-h3" ||
    fail "streams differ between hosts"
sed 's/^data://' "$work/stream-h1" | jq -r '"  \(.index) \(.seq) \(.payload)"'
log "same six messages in the same order on h1, h2, h3"

# --- reload ------------------------------------------------------------------------------
log "systemctl reload: log.level applies live, a restart-only key is named"
on h1 sed -i -e 's/^level = "info"/level = "info,openraft=warn"/' \
    -e 's/^sse_keepalive_secs = 15/sse_keepalive_secs = 10/' /etc/chatraftd/chatraftd.toml
on h1 systemctl reload chatraftd
journal_has() { on "$1" journalctl -u chatraftd --no-pager -o cat | grep -qF "$2"; }
wait_for 10 journal_has h1 "reload: log.level applied" || fail "log.level not applied on reload"
wait_for 10 journal_has h1 "api.sse_keepalive_secs changed" || fail "restart-only key not named"

# --- restarts under a writer -------------------------------------------------------------
# Sends messages to conv "e2e", round-robin, each retried with its msg_id until acknowledged
# (or 30 s); acknowledged ids go to $work/acked. Stops at $work/stop, 1500 messages or 180 s.
writer() {
    local i=0 deadline=$(($(date +%s) + 180)) id code until n=0
    local ips=("${ip[h1]}" "${ip[h2]}" "${ip[h3]}")
    while [ ! -e "$work/stop" ] && [ "$i" -lt 1500 ] && [ "$(date +%s)" -lt "$deadline" ]; do
        i=$((i + 1))
        id=$(cat /proc/sys/kernel/random/uuid)
        until=$(($(date +%s) + 30))
        while :; do
            n=$((n + 1))
            code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 -X POST \
                "http://${ips[$((n % 3))]}:8081/api/v1/message" -H 'Content-Type: application/json' \
                -d '{"conv_id":"e2e","sender":"writer","payload":"w-'$i'","msg_id":"'$id'"}') || true
            if [ "$code" = 201 ] || [ "$code" = 200 ]; then
                echo "$id" >>"$work/acked"
                break
            fi
            [ "$(date +%s)" -lt "$until" ] || break
            sleep 0.1
        done
    done
}
: >"$work/acked"
acked() { wc -l <"$work/acked"; }
acked_at_least() { [ "$(acked)" -ge "$1" ]; }
writer &
writer_pid=$!
wait_for 20 acked_at_least 20 || fail "the writer makes no progress"

role_of() { status "$1" | jq -r .role; }
find_role() {
    local want=$1 h
    for h in "${hosts[@]}"; do
        if [ "$(role_of "$h" 2>/dev/null)" = "$want" ]; then
            echo "$h"
            return 0
        fi
    done
    return 1
}
restart_one() {
    local h=$1 before pid
    before=$(acked)
    pid=$(on "$h" systemctl show -p MainPID --value chatraftd)
    log "systemctl restart chatraftd on $h ($2), $before acknowledged so far"
    on "$h" systemctl restart chatraftd || fail "restart on $h"
    [ "$(on "$h" systemctl show -p MainPID --value chatraftd)" != "$pid" ] || fail "$h did not restart"
    wait_for 60 cluster_ready || fail "the cluster did not recover after restarting $h"
    wait_for 30 acked_at_least $((before + 30)) || fail "writes stalled after restarting $h"
}
follower=$(find_role follower) || fail "no follower"
restart_one "$follower" follower
leader=$(find_role leader) || fail "no leader"
term_before=$(status "$leader" | jq .term)
restart_one "$leader" leader
new_leader=$(find_role leader) || fail "no leader after the restart"
# A leader back before the others' election timeout resumes its (persisted, committed) term;
# otherwise a new term has begun. Either way the writes went on.
log "leader was $leader in term $term_before, now $new_leader in term $(status "$new_leader" | jq .term)"
touch "$work/stop"
wait "$writer_pid"
writer_pid=""
log "writer done: $(acked) messages acknowledged"

# All three hold the same e2e conversation, containing every acknowledged msg_id once.
history() {
    local h=$1 from=1 page
    : >"$work/hist-$h"
    while :; do
        page=$(api "$h" "/api/v1/messages?conv_id=e2e&from=$from&limit=1000") || return 1
        jq -c '.messages[] | [.index, .seq, .msg_id, .payload]' <<<"$page" >>"$work/hist-$h"
        [ "$(jq '.messages | length' <<<"$page")" -gt 0 ] || break
        from=$(jq .next_from <<<"$page")
    done
}
same_everywhere() {
    history h1 && history h2 && history h3 &&
        cmp -s "$work/hist-h1" "$work/hist-h2" && cmp -s "$work/hist-h1" "$work/hist-h3"
}
wait_for 30 same_everywhere || fail "hosts differ in conversation e2e"
jq -r '.[2]' "$work/hist-h1" | sort >"$work/stored-ids"
[ -z "$(sort "$work/stored-ids" | uniq -d)" ] || fail "a msg_id is stored twice"
lost=$(sort "$work/acked" | comm -23 - "$work/stored-ids" | wc -l)
[ "$lost" = 0 ] || fail "$lost acknowledged messages are missing"
log "no acknowledged message lost: $(acked) acknowledged, $(wc -l <"$work/stored-ids") stored, identical on h1..h3"

# --- upgrade -----------------------------------------------------------------------------
up=$follower
log "upgrading $up from $version to $version2 with the node running"
conf_before=$(on "$up" sha256sum /etc/chatraftd/chatraftd.toml)
pid_before=$(on "$up" systemctl show -p MainPID --value chatraftd)
count_before=$(api "$up" '/api/v1/conversations' | jq '[.conversations[].count] | add')
docker cp "$deb2" "$run_id-$up:/root/"
on "$up" apt-get install -y -q "/root/$(basename "$deb2")" >"$work/apt-upgrade.log" 2>&1 || {
    cat "$work/apt-upgrade.log"
    fail "upgrade"
}
[ "$(on "$up" dpkg-query -W -f '${Version}' chatraftd)" = "$version2" ] || fail "not upgraded"
[ "$(on "$up" sha256sum /etc/chatraftd/chatraftd.toml)" = "$conf_before" ] || fail "config edits lost"
[ "$(on "$up" systemctl is-active chatraftd)" = active ] || fail "not running after the upgrade"
pid_after=$(on "$up" systemctl show -p MainPID --value chatraftd)
[ "$pid_after" != "$pid_before" ] || fail "the upgrade did not restart the node"
wait_for 60 cluster_ready || fail "cluster not ready after the upgrade"
count_after=$(api "$up" '/api/v1/conversations' | jq '[.conversations[].count] | add')
[ "$count_after" -ge "$count_before" ] || fail "data lost in the upgrade ($count_before -> $count_after)"
curl -sf --max-time 10 -X POST "http://${ip[$up]}:8081/api/v1/message" -H 'Content-Type: application/json' \
    -d '{"sender":"ops","payload":"after the upgrade"}' >/dev/null || fail "write after the upgrade"
wait_for 30 same_everywhere || fail "hosts differ after the upgrade"
log "upgrade kept config ($(cut -c1-12 <<<"$conf_before")...) and $count_after messages; pid $pid_before -> $pid_after"

# --- stop --------------------------------------------------------------------------------
for h in "${hosts[@]}"; do
    t0=$(date +%s%N)
    on "$h" systemctl stop chatraftd
    ms=$((($(date +%s%N) - t0) / 1000000))
    result=$(on "$h" systemctl show -p Result --value chatraftd)
    code=$(on "$h" systemctl show -p ExecMainStatus --value chatraftd)
    log "systemctl stop on $h: ${ms} ms, Result=$result, exit status $code"
    [ "$ms" -lt 10000 ] || fail "stop on $h took ${ms} ms"
    [ "$result" = success ] && [ "$code" = 0 ] || fail "unclean stop on $h"
done

# --- remove and purge --------------------------------------------------------------------
log "apt-get remove, then purge, on h3"
on h3 apt-get remove -y -q chatraftd >/dev/null 2>&1 || fail "remove"
on h3 test -f /etc/chatraftd/chatraftd.toml || fail "remove deleted the config"
on h3 test -f /var/lib/chatraftd/messages.db || fail "remove deleted the data"
on h3 apt-get purge -y -q chatraftd >/dev/null 2>&1 || fail "purge"
on h3 test ! -e /etc/chatraftd || fail "purge kept /etc/chatraftd"
on h3 test -f /var/lib/chatraftd/messages.db || fail "purge deleted the data"

# --- docker compose ----------------------------------------------------------------------
# docker-compose.yml as shipped, on free loopback ports instead of 8081-8083 / 12001-12003.
free_port() {
    local p
    while :; do
        p=$((20000 + RANDOM % 20000))
        ss -Htln "sport = :$p" | grep -q . || {
            echo "$p"
            return
        }
    done
}
log "docker compose: three nodes from docker-compose.yml"
compose_deb="packaging/docker/$(basename "$deb")"
cp "$deb" "$compose_deb"
export CHATRAFTD_BASE_IMAGE=$base_image CHATRAFTD_IMAGE=$compose_image
declare -A cport
for n in 1 2 3; do
    cport[$n]=$(free_port)
    export "NODE${n}_HTTP_PORT=${cport[$n]}" "NODE${n}_RAFT_PORT=$(free_port)"
done
compose_up=yes
"${compose[@]}" build -q >"$work/compose-build.log" 2>&1 || {
    cat "$work/compose-build.log"
    fail "compose build"
}
"${compose[@]}" up -d >"$work/compose-up.log" 2>&1 || {
    cat "$work/compose-up.log"
    fail "compose up"
}
compose_ready() {
    local n
    for n in 1 2 3; do
        [ "$(curl -sf --max-time 5 "http://127.0.0.1:${cport[$n]}/api/v1/status" |
            jq '[.members[] | select(.voter)] | length')" = 3 ] || return 1
        curl -sf --max-time 5 "http://127.0.0.1:${cport[$n]}/readyz" >/dev/null || return 1
    done
}
wait_for 90 compose_ready || fail "the compose cluster did not form"
for i in $(seq 1 6); do
    n=$(((i % 3) + 1))
    curl -sf --max-time 10 -X POST "http://127.0.0.1:${cport[$n]}/api/v1/message" \
        -H 'Content-Type: application/json' \
        -d '{"sender":"u'$n'","payload":"msg-'$i'-from-node'$n'","vector_clock":{"u'$n'":'$i'}}' >/dev/null ||
        fail "compose POST $i"
done
compose_history() {
    local n
    for n in 1 2 3; do
        curl -sf --max-time 5 "http://127.0.0.1:${cport[$n]}/api/v1/messages?from=1" |
            jq -c '[.messages[] | [.index, .seq, .payload]]' >"$work/compose-$n" || return 1
    done
    [ "$(jq length "$work/compose-1")" = 6 ] &&
        cmp -s "$work/compose-1" "$work/compose-2" && cmp -s "$work/compose-1" "$work/compose-3"
}
wait_for 20 compose_history || fail "compose nodes differ"
log "compose: same six messages in the same order on node1..node3"
[ "$(docker volume ls -q | grep -c "^chatraftd${run_id}_node[123]-data$")" = 3 ] || fail "no named volumes"

log "PASS: package end to end on three hosts, and docker compose"
