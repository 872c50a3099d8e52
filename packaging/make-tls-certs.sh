#!/bin/sh
# Makes a cluster CA (once) and a certificate for one chatraftd node, with openssl.
#
#   make-tls-certs.sh DIR NAME HOST [HOST ...]
#
# DIR/ca.crt and DIR/ca.key are created when missing (keep ca.key off the nodes); then
# DIR/NAME.crt and DIR/NAME.key, valid for every HOST (a DNS name or an IP address) as a
# server and as a client, as chatraftd's mutual TLS needs. DAYS sets the lifetime (825).
# With EXPIRED=1 the certificate's validity ended in 2020: for testing that it is refused.
set -eu

if [ $# -lt 3 ]; then
    echo "usage: $0 DIR NAME HOST [HOST ...]" >&2
    exit 2
fi
dir=$1 name=$2
shift 2
days=${DAYS:-825}
mkdir -p "$dir"
umask 077

if [ ! -f "$dir/ca.crt" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$dir/ca.key" -out "$dir/ca.crt" -days 3650 \
        -subj "/CN=chatraftd cluster CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    chmod 644 "$dir/ca.crt"
fi

sans=""
for host in "$@"; do
    case $host in
        *[!0-9.]* ) case $host in *:*) kind=IP ;; *) kind=DNS ;; esac ;;
        * ) kind=IP ;;
    esac
    sans="${sans:+$sans,}$kind:$host"
done
ext=$(mktemp)
work=$(mktemp -d)
trap 'rm -rf "$ext" "$work"' EXIT
cat > "$ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$sans
EXT

openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$dir/$name.key" -out "$work/req.csr" -subj "/CN=$name" 2>/dev/null
if [ "${EXPIRED:-0}" = 1 ]; then
    # `openssl x509` cannot back-date a certificate; `openssl ca` can.
    : > "$work/index.txt"
    echo 01 > "$work/serial"
    cat > "$work/ca.cnf" <<CNF
[ca]
default_ca = local
[local]
database = $work/index.txt
serial = $work/serial
new_certs_dir = $work
certificate = $dir/ca.crt
private_key = $dir/ca.key
default_md = sha256
policy = anything
[anything]
commonName = supplied
CNF
    openssl ca -batch -notext -config "$work/ca.cnf" -extfile "$ext" \
        -startdate 20200101000000Z -enddate 20200201000000Z \
        -in "$work/req.csr" -out "$dir/$name.crt" 2>/dev/null
else
    openssl x509 -req -in "$work/req.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
        -CAcreateserial -CAserial "$work/ca.srl" -days "$days" -sha256 \
        -extfile "$ext" -out "$dir/$name.crt" 2>/dev/null
fi
chmod 644 "$dir/$name.crt"
echo "$dir/$name.crt ($sans), key $dir/$name.key, CA $dir/ca.crt"
