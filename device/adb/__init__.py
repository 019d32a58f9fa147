"""Android phones over ADB: `adb:SERIAL`, `adb-tcp:HOST:PORT` and `adb-server:HOST:PORT/SERIAL`.

Two transports behind one interface (`run`, `push`, `close`): Google's adb server (its host
protocol, `host_protocol.py` + `server_connection.py`), used by `adb:SERIAL` whenever a server
answers where `adb` would look for it and by every `adb-server:` URI; and adb-shell directly
(`connection.py`) over TCP (`adb-tcp:`) and over USB when no server is running (libusb needed).
The direct path's host key is the adb tool's own `~/.android/adbkey` (made, mode 0600, when
absent), so a phone that already trusts `adb` on this machine trusts us too; otherwise accept the
prompt on the phone.

Discovery (`amc-mobile devices`): the phones of the local adb server and of every server in
`AMC_ADB_SERVERS` (`server_discovery.py`), phones on USB when libusb is usable and no server holds
them, plus the phones listed in `AMC_ADB_TCP` (comma-separated `host:port`, e.g.
`AMC_ADB_TCP=192.168.1.20:5555,10.0.0.7:5555`): each with its model, or with the reason it could not
be reached; a malformed entry is an AmcError. TCP phones are never scanned for.

Modules: `connection` (direct transport, keys, auth prompt, timeouts), `host_protocol` (the adb
server's smart-socket protocol), `server_connection` (a phone behind a server, which server
`adb:SERIAL` uses, errors that say what to do), `server_discovery` (`devices` over servers),
`discovery` (`devices`: servers, USB, $AMC_ADB_TCP), `uri_options` (URI options and addresses),
`phone_info` (props, clusters, governors, thermal), `deploy` (runner push by hash), `hygiene`
(affinity/threads defaults, thermal guard, snapshots), `remote_process` (a command in the background
on the phone, polled, killed by PID; stale sessions), `et_bench_driver` (et_bench on the phone through
`device.runner_driver`), `executor_runner` (the stock runner's argv and output), `stock_driver` (a
batch through the stock runner), `adb_device` (the Device).
"""

from .adb_device import AdbDevice
from .discovery import discover
from .connection import AdbConnectionLost

__all__ = ["AdbConnectionLost", "AdbDevice", "discover"]
