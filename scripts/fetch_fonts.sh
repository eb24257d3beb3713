#!/usr/bin/env bash
# Debian font packages for the canonical sanitisation of seed 001 ("Less is More" used 340 fonts;
# matplotlib ships about 32 usable ones). Downloads the packages with apt-get (no root needed, no
# install) and extracts their TTF/OTF files into one folder, for `--fonts-dir`.
#   usage: scripts/fetch_fonts.sh [FOLDER]   (default: data/fonts)
# fonts-noto-extra is left out on purpose: 1,540 weights of designs fonts-noto-core already has.
set -euo pipefail
dest=${1:-data/fonts}
packages=(
  fonts-noto-core fonts-liberation fonts-liberation2 fonts-freefont-ttf fonts-urw-base35
  fonts-dejavu-core fonts-dejavu-extra fonts-crosextra-carlito fonts-crosextra-caladea
  fonts-cantarell fonts-roboto-unhinted fonts-open-sans fonts-lato fonts-texgyre
  fonts-linuxlibertine fonts-ebgaramond fonts-comic-neue fonts-hack fonts-inconsolata
  fonts-firacode fonts-jetbrains-mono fonts-adf-accanthis fonts-adf-gillius fonts-adf-universalis
  fonts-junicode fonts-lmodern fonts-cabin fonts-quicksand fonts-mononoki fonts-sil-gentium
  fonts-sil-andika fonts-sil-charis fonts-league-spartan fonts-f500 fonts-croscore fonts-go
  fonts-hermit fonts-monoid fonts-play fonts-averia-gwf fonts-averia-sans-gwf
  fonts-averia-serif-gwf fonts-breip fonts-dkg-handwriting fonts-femkeklaver fonts-humor-sans
  fonts-isabella fonts-kristi fonts-mplus fonts-oflb-euterpe fonts-okolaks fonts-prociono
  fonts-radisnoir fonts-rufscript fonts-sil-gentiumplus fonts-staypuft fonts-tuffy
  fonts-yanone-kaffeesatz
)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download "${packages[@]}" >/dev/null)
mkdir -p "$dest"
for deb in "$work"/*.deb; do
  dpkg-deb -x "$deb" "$work/root"
done
find "$work/root" -type f \( -iname '*.ttf' -o -iname '*.otf' \) -exec cp -n {} "$dest"/ \;
echo "$(find "$dest" -maxdepth 1 -type f | wc -l) font files in $dest"
