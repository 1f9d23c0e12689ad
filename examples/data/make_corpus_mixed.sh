#!/usr/bin/env bash
# Builds examples/data/perl-python-doc.txt.xz, the larger training text of examples/train_moe_lm.py
# (--data), from two Debian packages, so that a few thousand steps of 4096 bytes stay near one pass
# over the text (the 8.5 MB perl-doc corpus alone is read ~3 times by a 6000-step run, which then
# measures memorisation; bench/RESULTS.md, session 4):
#   - perl-doc (bookworm 5.36.0-7+deb12u*): the pod/perl*.pod documents, rendered by pod2text,
#     selected exactly as make_corpus.sh does. License: same terms as Perl, "GPL-1+ or Artistic"
#     (/usr/share/doc/perl-doc/copyright).
#   - python3.11-doc (bookworm 3.11.2-6+deb12u*): the reStructuredText sources of the Python 3.11
#     documentation as the package ships them (html/_sources/**/*.rst.txt). License: the Python
#     Software Foundation License Version 2 (its code examples also Zero-Clause BSD; see
#     _sources/license.rst.txt and /usr/share/doc/python3.11-doc/copyright).
# Each document is preceded by a line "==== <package>/<name> ====". Documents are ordered by the
# SHA-1 of that header, a fixed pseudo-random order that mixes both sources, so the last 1% the
# example holds out for validation draws from both.
#
# Usage: examples/data/make_corpus_mixed.sh [OUT]   (default: next to this script)
#   needs: perl-doc and python3.11-doc installed (apt-get install perl-doc python3.11-doc),
#   pod2text, sha1sum, xz.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/perl-python-doc.txt.xz}
for p in perl-doc python3.11-doc; do
  dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || {
    echo "make_corpus_mixed.sh: $p is not installed (apt-get install $p)" >&2
    exit 1
  }
done
poddir=$(dirname "$(dpkg -L perl-doc | grep '/pod/perl\.pod$')")
rstdir=/usr/share/doc/python3.11/html/_sources
[ -d "$rstdir" ] || { echo "make_corpus_mixed.sh: $rstdir missing" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/docs"
emit() {  # emit HEADER: stdin -> one document file named by the header's SHA-1
  local key
  key=$(printf '%s' "$1" | sha1sum | cut -c1-40)
  { printf '==== %s ====\n\n' "$1"; cat; printf '\n'; } >"$work/docs/$key"
}
while IFS= read -r f; do
  name=$(basename "$f" .pod)
  case "$name" in
    perlpodstyle | perltoc | perlcn | perljp | perlko | perltw) continue ;;
  esac
  LC_ALL=C.UTF-8 pod2text --loose --width=78 "$f" 2>/dev/null | emit "perl-doc/$name" || true
done < <(LC_ALL=C ls "$poddir"/perl*.pod)
while IFS= read -r f; do
  rel=${f#"$rstdir"/}
  emit "python3.11-doc/${rel%.rst.txt}" <"$f"
done < <(cd "$rstdir" && LC_ALL=C find "$PWD" -name '*.rst.txt' | LC_ALL=C sort)
n=$(find "$work/docs" -type f | wc -l)
(cd "$work/docs" && LC_ALL=C ls | while IFS= read -r k; do cat "$k"; done) >"$work/all.txt"
xz -9e -T1 -c "$work/all.txt" >"$out"
echo "make_corpus_mixed.sh: perl-doc $(dpkg-query -W -f '${Version}' perl-doc)," \
  "python3.11-doc $(dpkg-query -W -f '${Version}' python3.11-doc): $n documents," \
  "$(wc -c <"$work/all.txt") bytes of text -> $out ($(wc -c <"$out") bytes xz)"
