# Shared by download_data.sh and download_checkpoints.sh (sourced, not run): downloads that are
# atomic (temp file, then mv), skip files already present, and fail fast with a clear message when
# offline. Expects ROOT and CONNECT_TIMEOUT; FETCH_QUIET=1 hides progress; FETCH_HINT adds a line
# to the failure message.
TMP=""
cleanup() {
    if [ -n "$TMP" ]; then
        rm -f "$TMP"
        rmdir "$(dirname "$TMP")" 2>/dev/null || true  # an empty folder must not hide another copy
    fi
}
trap cleanup EXIT

# fetch URL DEST [SHA256]: download unless DEST exists; verify the hash when given.
fetch() {
    local url="$1" dest="$2" sha="${3:-}"
    if [ -s "$dest" ]; then
        echo "present: ${dest#"$ROOT"/}"
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    TMP="$dest.$$.tmp"
    echo "downloading $url"
    local ok=0
    if command -v curl >/dev/null 2>&1; then
        curl "$([ "${FETCH_QUIET:-0}" = 1 ] && echo -fsSL || echo -fL)" --connect-timeout "$CONNECT_TIMEOUT" \
            --retry 2 --retry-connrefused -o "$TMP" "$url" || ok=$?
    elif command -v wget >/dev/null 2>&1; then
        wget "$([ "${FETCH_QUIET:-0}" = 1 ] && echo -q || echo -nv)" --connect-timeout="$CONNECT_TIMEOUT" \
            --tries=3 -O "$TMP" "$url" || ok=$?
    else
        echo "error: neither curl nor wget is installed" >&2
        exit 1
    fi
    if [ "$ok" -ne 0 ] || [ ! -s "$TMP" ]; then
        echo "error: could not download $url (exit $ok)." >&2
        echo "       No network? This script needs internet access; files already downloaded were kept." >&2
        [ -n "${FETCH_HINT:-}" ] && echo "       $FETCH_HINT" >&2
        exit 1
    fi
    if [ -n "$sha" ]; then
        local got
        got="$( (sha256sum "$TMP" 2>/dev/null || shasum -a 256 "$TMP") | cut -d' ' -f1)"
        if [ "$got" != "$sha" ]; then
            echo "error: $url has SHA-256 $got, expected $sha" >&2
            exit 1
        fi
    fi
    mv "$TMP" "$dest"
    TMP=""
    echo "saved: ${dest#"$ROOT"/}"
}
