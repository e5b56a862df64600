# Sourced by the Nix benches: builds the test Nix tarball in $1 ($1/nix.tar.xz) and sets V (its
# version), OUT, CLOSURE, TOP and SHA. The tarball is in the official layout, made from real
# store paths built by the host's Nix: a nix-<version> package of wrappers around the host's
# programs and a ~20 MiB payload (a copy of /usr/share/perl), so that unpacking and
# registering have real work to do; with `nopayload` as $2, the wrappers only.
TMP=$1
V=2.8.0-bench
export NIX_CONFIG=$'substituters =\nbuild-users-group =\nsandbox = false'
if [ "${2:-payload}" = payload ]; then
cat > "$TMP/nix.nix" <<NIXEOF
let payload = derivation { name = "bench-payload"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "/bin/cp -r /usr/share/perl \$out" ]; };
in derivation { name = "nix-$V"; system = "x86_64-linux"; builder = "/bin/sh"; inherit payload;
  args = [ "-c" "export PATH=/usr/bin:/bin; mkdir -p \$out/bin; for n in nix nix-store nix-daemon nix-build; do printf '#!/bin/sh\\nexec /usr/bin/%s \"\$@\"\\n' \$n > \$out/bin/\$n; chmod +x \$out/bin/\$n; done; echo \$payload > \$out/payload" ]; }
NIXEOF
else
cat > "$TMP/nix.nix" <<NIXEOF
derivation { name = "nix-$V"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "export PATH=/usr/bin:/bin; mkdir -p \$out/bin; for n in nix nix-store nix-daemon nix-build; do printf '#!/bin/sh\\nexec /usr/bin/%s \"\$@\"\\n' \$n > \$out/bin/\$n; chmod +x \$out/bin/\$n; done" ]; }
NIXEOF
fi
OUT=$(nix-build "$TMP/nix.nix" --no-out-link 2>/dev/null)
TOP=$TMP/nix-$V-x86_64-linux
mkdir -p "$TOP/store"
CLOSURE=$(nix-store -qR "$OUT")
for p in $CLOSURE; do cp -a "$p" "$TOP/store/"; done
nix-store --dump-db $CLOSURE > "$TOP/.reginfo"
tar -C "$TMP" -cJf "$TMP/nix.tar.xz" "nix-$V-x86_64-linux"
SHA=$(sha256sum "$TMP/nix.tar.xz" | cut -d' ' -f1)
unset NIX_CONFIG

# The [nix] section of a bench's config for this tarball: its netrc in $1, build users' locks in
# $2.
nix_toml() {
  cat <<TOML
[nix]
tarball = "$TMP/nix.tar.xz"
sha256 = "$SHA"
version = "$V"
# Debian's Nix 2.8 (the bench tarball's programs) predates both advisories' fixes.
acknowledged_advisories = ["CVE-2026-39860", "CVE-2024-27297"]
netrc_file = "$1"
sandbox = false
substituters = []
trusted_public_keys = []
userpool = "$2"
TOML
}

# A closure for the store to have before the jobs (~20 MiB, two paths) in file $1, unique to
# tag $2 so the host's store cannot help.
warm_closure() {
  cat > "$1" <<NIXEOF
let dep = derivation { name = "bench-warm-dep-$2"; system = "x86_64-linux"; builder = "/bin/sh";
  args = [ "-c" "/bin/cp -r /usr/share/perl \$out" ]; };
in derivation { name = "bench-warm-$2"; system = "x86_64-linux"; builder = "/bin/sh"; inherit dep;
  args = [ "-c" "echo \$dep > \$out" ]; }
NIXEOF
  chmod 644 "$1"
}
