"""The file helpers live in the bottom layer (`device.files`), so that every package reads and writes
files by the same rules."""

from device.files import atomic_write, config_hash, make_folder, read_json, read_text, sha256_file, write_json

__all__ = ["atomic_write", "config_hash", "make_folder", "read_json", "read_text", "sha256_file", "write_json"]
