#!/usr/bin/env bash
# The example Prometheus alerting rules (deploy/prometheus/alerts.yml) are
# valid (`promtool check rules`) and do what they say on synthetic series
# (`promtool test rules deploy/prometheus/alerts_test.yml`). promtool comes
# with Debian's `prometheus` package (deploy/test.sh installs it for the
# plain stage).
set -euo pipefail
ROOT="${1:-${ML_SOURCE_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}}"
DIR="$ROOT/deploy/prometheus"
if ! command -v promtool >/dev/null 2>&1; then
    echo "rules.sh: promtool not found (apt-get install prometheus)" >&2
    exit 1
fi
promtool check rules "$DIR/alerts.yml"
# promtool resolves rule_files against the test file's folder.
cd "$DIR"
promtool test rules alerts_test.yml
