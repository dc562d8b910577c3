#!/bin/sh
# nginx in the foreground. On SIGTERM (`docker stop`) it keeps serving for STOP_DELAY
# seconds and then quits gracefully, so a test can see the task leave routemesh's rotation
# while the process is still running.
nginx -g 'daemon off;' &
pid=$!
trap 'sleep "${STOP_DELAY:-0}"; kill -QUIT "$pid"; wait "$pid"; exit 0' TERM
wait "$pid"
