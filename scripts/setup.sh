#!/usr/bin/env bash
# Installs everything groundwatch needs on a fresh machine: Debian's GStreamer RTSP server (tests drive it with
# /usr/bin/python3), ffmpeg (decode benchmark), Mosquitto (the MQTT bridge's tests start their own broker from
# a config file; the package's service is not used) and chromium (the web console's browser tests drive
# /usr/bin/chromium through Playwright; `playwright install` is never run), then this package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=0
for pkg in gir1.2-gst-rtsp-server-1.0 python3-gst-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good \
           gstreamer1.0-plugins-ugly ffmpeg mosquitto chromium; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt=1
done
if [ "$need_apt" = 1 ] && [ "${GROUNDWATCH_SKIP_APT:-0}" != 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends gir1.2-gst-rtsp-server-1.0 python3-gst-1.0 \
        gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly ffmpeg mosquitto chromium
fi

python3 -m pip install -q -e ".[test]"
