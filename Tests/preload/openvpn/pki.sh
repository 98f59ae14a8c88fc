#!/bin/sh
# SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
# A throwaway PKI for BindPreloadOpenVPNTests, made in folder $1: a CA, one server certificate
# (serverAuth, as the clients' remote-cert-tls server demands) and one client certificate that
# every client shares (the servers run with duplicate-cn). EC P-256: fast to make and to handshake.
set -eu
cd "$1"
days=2
ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
openssl req -x509 $ec -keyout ca.key -out ca.crt -days $days -subj /CN=reuseportd-test-ca 2>/dev/null
for who in server client; do
    if [ $who = server ]; then usage=serverAuth; else usage=clientAuth; fi
    openssl req $ec -keyout $who.key -out $who.csr -subj /CN=$who 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyAgreement\nextendedKeyUsage=%s\n' $usage >$who.ext
    openssl x509 -req -in $who.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out $who.crt -days $days \
        -extfile $who.ext 2>/dev/null
done
chmod 600 ./*.key
