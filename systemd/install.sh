#!/bin/sh
# Install xtalsym as a systemd service (docs/DAEMON.md, "Running under systemd").
#
#   sudo systemd/install.sh [--prefix /opt/xtalsym] [--bundle DIR] [--gpu] [--python python3]
#                           [--extras ml,daemon] [--skip-venv] [--destdir DIR]
#
#   PREFIX/venv           virtual environment: torch==2.13.0 first, then xtalsym[EXTRAS] with
#                         torch held at that pin (set TORCH_SPEC for a CUDA build)
#   PREFIX/share/bundle   the model bundle (default: the shipped reference_index/), verified
#   /etc/xtalsym/xtalsym.toml   from systemd/xtalsym.example.toml; an existing one is kept
#   /etc/systemd/system/xtalsym.service            ExecStart under PREFIX
#   /etc/systemd/system/xtalsym.service.d/gpu.conf(.example)   GPU drop-in (--gpu enables it)
#
# DESTDIR (or --destdir) installs under a staging root without root rights and without
# touching systemd; otherwise `systemctl daemon-reload` runs when systemd is PID 1.
set -eu

SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/opt/xtalsym
BUNDLE="$SRC/reference_index"
PYTHON=python3
EXTRAS=ml,daemon
SKIP_VENV=0
GPU=0
DESTDIR=${DESTDIR:-}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

die() { echo "install.sh: error: $*" >&2; exit 2; }
need_arg() { [ $# -ge 2 ] || die "$1 needs a value"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) need_arg "$@"; PREFIX=$2; shift 2 ;;
        --bundle) need_arg "$@"; BUNDLE=$2; shift 2 ;;
        --python) need_arg "$@"; PYTHON=$2; shift 2 ;;
        --extras) need_arg "$@"; EXTRAS=$2; shift 2 ;;
        --destdir) need_arg "$@"; DESTDIR=$2; shift 2 ;;
        --skip-venv) SKIP_VENV=1; shift ;;
        --gpu) GPU=1; shift ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

case "$PREFIX" in /*) ;; *) die "--prefix '$PREFIX' must be an absolute path" ;; esac
[ -f "$BUNDLE/manifest.json" ] || die "bundle '$BUNDLE' has no manifest.json (not a bundle)"
case "$TORCH_SPEC" in torch==*) ;; *) die "TORCH_SPEC '$TORCH_SPEC' must pin a version (torch==X.Y.Z)" ;; esac

umask 022
ROOT=${DESTDIR%/}
VENV="$PREFIX/venv"
SHARE="$PREFIX/share"
UNIT_DIR=/etc/systemd/system

if [ "$SKIP_VENV" = 0 ]; then
    echo "install.sh: virtual environment $ROOT$VENV"
    "$PYTHON" -m venv "$ROOT$VENV"
    "$ROOT$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$ROOT$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
    constraints=$(mktemp)
    trap 'rm -f "$constraints"' EXIT
    echo "$TORCH_SPEC" > "$constraints"  # the extras must not move torch off the pin
    "$ROOT$VENV/bin/python" -m pip install --quiet -c "$constraints" "$SRC[$EXTRAS]"
fi

echo "install.sh: bundle $ROOT$SHARE/bundle (from $BUNDLE)"
mkdir -p "$ROOT$SHARE"
staging="$ROOT$SHARE/.bundle.new"
rm -rf "$staging"
cp -R "$BUNDLE" "$staging"
rm -rf "$staging/.cache"  # engine caches go to /var/cache/xtalsym under the service
if [ -x "$ROOT$VENV/bin/xtalsym" ]; then
    "$ROOT$VENV/bin/xtalsym" bundle verify "$staging" || { rm -rf "$staging"; die "bundle '$BUNDLE' fails verification"; }
else
    echo "install.sh: $ROOT$VENV/bin/xtalsym not found: bundle not verified now (the daemon verifies it at every load)"
fi
chmod -R a+rX,go-w "$staging"
rm -rf "$ROOT$SHARE/bundle"
mv "$staging" "$ROOT$SHARE/bundle"

config="$ROOT/etc/xtalsym/xtalsym.toml"
mkdir -p "$ROOT/etc/xtalsym"
if [ -e "$config" ]; then
    echo "install.sh: keeping the existing $config"
else
    # the example holds every default; only the bundle path differs
    sed "/^\[bundle\]/,/^\[/ s#^path = \"\"[^#]*#path = \"$SHARE/bundle\"  #" \
        "$SRC/systemd/xtalsym.example.toml" > "$config"
    grep -q "^path = \"$SHARE/bundle\"" "$config" || die "could not set bundle.path in $config"
    chmod 0644 "$config"
    echo "install.sh: wrote $config"
fi

mkdir -p "$ROOT$UNIT_DIR/xtalsym.service.d"
sed "s#^ExecStart=/opt/xtalsym/venv/bin/xtalsym #ExecStart=$VENV/bin/xtalsym #" \
    "$SRC/systemd/xtalsym.service" > "$ROOT$UNIT_DIR/xtalsym.service"
grep -q "^ExecStart=$VENV/bin/xtalsym serve" "$ROOT$UNIT_DIR/xtalsym.service" || die "could not set ExecStart"
chmod 0644 "$ROOT$UNIT_DIR/xtalsym.service"
if [ "$GPU" = 1 ]; then
    install -m 0644 "$SRC/systemd/xtalsym-gpu.conf" "$ROOT$UNIT_DIR/xtalsym.service.d/gpu.conf"
    rm -f "$ROOT$UNIT_DIR/xtalsym.service.d/gpu.conf.example"
else
    install -m 0644 "$SRC/systemd/xtalsym-gpu.conf" "$ROOT$UNIT_DIR/xtalsym.service.d/gpu.conf.example"
fi
echo "install.sh: unit $ROOT$UNIT_DIR/xtalsym.service"

if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    echo "install.sh: done. Start it: systemctl enable --now xtalsym; log: journalctl -u xtalsym -f"
else
    echo "install.sh: done (systemd not reloaded: staging root '$ROOT' or systemd is not running)"
fi
