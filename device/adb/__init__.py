"""Android phones over ADB: `adb:SERIAL` (USB) and `adb-tcp:HOST:PORT` (TCP), through adb-shell.

No adb server is needed (a running one holds USB phones: `adb kill-server` first). The host key is
the adb tool's own `~/.android/adbkey` (made, mode 0600, when absent), so a phone that already
trusts `adb` on this machine trusts us too; otherwise accept the prompt on the phone.

Discovery (`amc-mobile devices`): phones on USB when libusb is usable, plus the phones listed in
`AMC_ADB_TCP` (comma-separated `host:port`, e.g. `AMC_ADB_TCP=192.168.1.20:5555,10.0.0.7:5555`): each
with its model, or with the reason it could not be reached; a malformed entry is an AmcError. TCP
phones are never scanned for.

Modules: `connection` (transport, keys, auth prompt, timeouts), `phone_info` (props, clusters,
governors, thermal), `deploy` (runner push by hash), `hygiene` (affinity/threads defaults, thermal
guard, snapshots), `executor_runner` (the stock runner's argv and output), `adb_device` (the Device).
"""

from .adb_device import AdbDevice, discover
from .connection import AdbConnectionLost

__all__ = ["AdbConnectionLost", "AdbDevice", "discover"]
