#!/usr/bin/env bash
# Trial TLS certificates for a Flower SuperLink: a certificate authority (CA) and a server
# certificate it signs, valid for 127.0.0.1, ::1 and localhost plus every host name or IP
# address given after OUTDIR (the addresses SuperNodes and `flwr` use to reach the server).
#
#   scripts/make_certs.sh OUTDIR [HOST_OR_IP ...]
#
# Writes OUTDIR/ca.crt (give it to every SuperNode and to `flwr`), OUTDIR/ca.key (keep it
# private, or delete it once the server certificate is made), OUTDIR/server.crt and
# OUTDIR/server.key (the SuperLink's). The certificates are self-made: for trials and
# private networks; an organisation with its own CA should sign the server's with it.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: $0 OUTDIR [HOST_OR_IP ...]" >&2
    exit 2
fi
command -v openssl >/dev/null || { echo "error: openssl is not installed" >&2; exit 2; }
out="$1"
shift

names="IP:127.0.0.1,IP:::1,DNS:localhost"
for host in "$@"; do
    if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then
        names+=",IP:$host"
    else
        names+=",DNS:$host"
    fi
done

# openssl chatters on stderr even when it succeeds: show its output only on failure
quiet() {
    local output
    output=$("$@" 2>&1) || { echo "error: $* failed: $output" >&2; exit 1; }
}

mkdir -p "$out"
umask 077  # the private keys are readable by their owner only
days=365

quiet openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$days" \
    -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=fedlora trial CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign"

quiet openssl req -newkey rsa:2048 -nodes -sha256 \
    -keyout "$out/server.key" -out "$out/server.csr" -subj "/CN=fedlora superlink"

extensions="$out/server.ext"
cat >"$extensions" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
subjectAltName = $names
EOF
quiet openssl x509 -req -sha256 -days "$days" -in "$out/server.csr" \
    -CA "$out/ca.crt" -CAkey "$out/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
    -extfile "$extensions" -out "$out/server.crt"
rm -f "$out/server.csr" "$extensions"
chmod 644 "$out/ca.crt" "$out/server.crt"  # certificates are public

quiet openssl verify -CAfile "$out/ca.crt" "$out/server.crt"
echo "certificates for $names in $out: ca.crt, ca.key, server.crt, server.key"
