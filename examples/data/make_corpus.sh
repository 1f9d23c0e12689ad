#!/usr/bin/env bash
# Regenerates examples/data/perl-doc.txt.xz, the training text of examples/train_moe_lm.py, from
# Debian's `perl-doc` package (bookworm: 5.36.0-7+deb12u*; the Perl core documentation).
#
# License of the text: the Perl documentation is distributed under the same terms as Perl itself,
# "GPL-1+ or Artistic" (see /usr/share/doc/perl-doc/copyright, which lists every pod file). We
# take the pod/perl*.pod files, rendered to plain text with pod2text (perl core), in sorted file
# order, skipping: perlpodstyle.pod (its own permissive "RRA-KEEP-THIS-NOTICE" license, kept out
# so that one license covers the whole corpus), perltoc.pod (a generated table of contents), and
# the non-English introductions perlcn/perljp/perlko/perltw. Each document is preceded by a line
# "==== <name> ====".
#
# Usage: examples/data/make_corpus.sh [OUT]   (default: next to this script)
#   needs: perl-doc installed (apt-get install perl-doc), pod2text, xz.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/perl-doc.txt.xz}
dpkg-query -W -f '${Status}' perl-doc 2>/dev/null | grep -q "install ok installed" || {
  echo "make_corpus.sh: perl-doc is not installed (apt-get install perl-doc)" >&2
  exit 1
}
ver=$(dpkg-query -W -f '${Version}' perl-doc)
poddir=$(dirname "$(dpkg -L perl-doc | grep '/pod/perl\.pod$')")
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
n=0
while IFS= read -r f; do
  name=$(basename "$f" .pod)
  case "$name" in
    perlpodstyle | perltoc | perlcn | perljp | perlko | perltw) continue ;;
  esac
  printf '==== %s ====\n\n' "$name" >>"$tmp"
  LC_ALL=C.UTF-8 pod2text --loose --width=78 "$f" >>"$tmp" 2>/dev/null || true
  printf '\n' >>"$tmp"
  n=$((n + 1))
done < <(LC_ALL=C ls "$poddir"/perl*.pod)
xz -9e -T1 -c "$tmp" >"$out"
echo "make_corpus.sh: perl-doc $ver, $n documents, $(wc -c <"$tmp") bytes of text -> $out" \
  "($(wc -c <"$out") bytes xz)"
