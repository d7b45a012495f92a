# Shared by .ci/run and its helpers: where the cached interpreters live, and the machine's
# own package mirror and pip configuration, read at run time (nothing of a registry is
# written into the repository).

CACHE=${MPEVENTFD_CI_CACHE:-/var/cache/mpeventfd-ci}

# The Debian mirror apt already uses (deb822 sources first, then the one-line format).
debian_mirror() {
    local uri
    uri=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null |
        awk '{print $2}' | grep -v -- '-security' | head -n 1 || true)
    if [ -z "$uri" ]; then
        uri=$(grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null |
            awk '{print $2}' | grep -v -- '-security' | head -n 1 || true)
    fi
    [ -n "$uri" ] || { echo "no Debian mirror in this machine's apt sources" >&2; return 1; }
    echo "${uri%/}"
}

# Files and folders of the host's pip configuration that a chroot must see: the config
# files, and the local package folders they name (find-links, file:// indexes), none
# inside a folder already listed.
pip_paths() {
    local f p
    {
        for f in /etc/pip.conf "$HOME/.config/pip/pip.conf" /etc/xdg/pip; do
            [ -e "$f" ] && echo "$f"
        done
        { cat /etc/pip.conf "$HOME/.config/pip/pip.conf" /etc/xdg/pip/*.conf 2>/dev/null
          env | grep '^PIP_' || true; } |
            grep -oE '(file://)?/[^ ,"]+' | sed 's#^file://##' |
            while read -r p; do
                p=${p%/}
                p=${p%/simple}  # (a local index's files live beside its simple/ pages)
                while [ -n "$p" ] && [ ! -e "$p" ]; do p=${p%/*}; done
                if [ -n "$p" ] && [ "$p" != / ]; then echo "$p"; fi
            done
    } | sort -u | awk '{ for (i = 1; i <= n; i++) if (index($0, kept[i] "/") == 1) next
                         kept[++n] = $0; print }'
}
