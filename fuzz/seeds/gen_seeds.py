#!/usr/bin/env python3
"""Write the seed corpora of the virtqueue, virtio_pci_regs and emudevd_config fuzz targets.

Run from fuzz/: python3 seeds/gen_seeds.py  (layouts are documented in each target's header).
"""
import os
import struct

BASE = 0x1_0000
INIT_LEN = 0x1040


def put(d, name, data):
    os.makedirs(f"corpus/{d}", exist_ok=True)
    with open(f"corpus/{d}/{name}", "wb") as f:
        f.write(data)


def desc(addr, ln, w3, w4):
    return struct.pack("<QIHH", addr, ln, w3, w4)


def window(parts):
    b = bytearray(INIT_LEN)
    for off, data in parts:
        b[off:off + len(data)] = data
    return bytes(b)


def op_write(off, data):
    return bytes([6]) + struct.pack("<HB", off, len(data)) + data


# --- virtqueue ---------------------------------------------------------------------------
NEXT, WRITE, INDIRECT, AVAIL = 1, 2, 4, 0x80
split_chain = window([
    (0, desc(BASE + 0x4000, 16, NEXT, 1) + desc(BASE + 0x5000, 512, WRITE, 0)),
    (0x1000, struct.pack("<HHH", 0, 1, 0)),
])
for mem in (0, 8):
    put("virtqueue", f"split-chain-mem{mem}", bytes([0x36 | mem]) + split_chain + b"\x00\x03\x04\x05")
    put("virtqueue", f"split-chain-late-complete-mem{mem}",
        bytes([0x36 | mem]) + split_chain + b"\x01\x03\x02\x03")
split_indirect = window([
    (0, desc(BASE + 0x6000, 32, INDIRECT, 0)),
    (0x1000, struct.pack("<HHH", 0, 1, 0)),
])
table = desc(BASE + 0x4000, 16, NEXT, 1) + desc(BASE + 0x5000, 64, WRITE, 0)
put("virtqueue", "split-indirect", bytes([0x36]) + split_indirect + op_write(0x6000, table) + b"\x00\x03")
# A second request published by the driver mid-run (avail idx 1 -> 2).
put("virtqueue", "split-two-rounds",
    bytes([0x36]) + split_chain + b"\x00\x03" + op_write(0x1002, struct.pack("<HH", 2, 0)) + b"\x00\x03")
packed_chain = window([
    (0, desc(BASE + 0x4000, 16, 0, NEXT | AVAIL) + desc(BASE + 0x5000, 512, 0, WRITE | AVAIL)),
])
for mem in (0, 8):
    put("virtqueue", f"packed-chain-mem{mem}", bytes([0x33 | mem]) + packed_chain + b"\x00\x03\x04\x05")
packed_indirect = window([(0, desc(BASE + 0x6000, 32, 0, INDIRECT | AVAIL))])
put("virtqueue", "packed-indirect",
    bytes([0x37]) + packed_indirect + op_write(0x6000, desc(BASE + 0x4000, 16, 0, 0) + desc(BASE + 0x5000, 64, 0, WRITE)) + b"\x00\x03")

# --- virtio_pci_regs ---------------------------------------------------------------------
W = {1: 0, 2: 1, 4: 2, 8: 3}


def bar_w(off, width, v):
    return bytes([0]) + struct.pack("<HB", off, W[width]) + struct.pack("<Q", v)


def bar_r(off, width):
    return bytes([3]) + struct.pack("<HB", off, W[width]) + bytes(8)


def cfg_w(off, width, v):
    return bytes([4]) + struct.pack("<HB", off, W[width]) + struct.pack("<Q", v)


def ram_w(at, v):
    return bytes([6]) + struct.pack("<HB", at // 8, 3) + struct.pack("<Q", v)


bringup = b"".join([
    cfg_w(4, 2, 0x6),  # memory space + bus master
    bar_w(0x14, 1, 0), bar_w(0x14, 1, 1), bar_w(0x14, 1, 3),
    bar_w(0x00, 4, 1), bar_r(0x04, 4),
    bar_w(0x08, 4, 1), bar_w(0x0c, 4, 1),  # VERSION_1
    bar_w(0x08, 4, 0), bar_w(0x0c, 4, 0x1000_0000),  # INDIRECT_DESC
    bar_w(0x14, 1, 0xb), bar_r(0x14, 1),
    bar_w(0x16, 2, 0), bar_r(0x18, 2), bar_w(0x18, 2, 8),
    bar_w(0x20, 8, 0x1_0000), bar_w(0x28, 8, 0x1_1000), bar_w(0x30, 8, 0x1_2000),
    bar_w(0x1c, 2, 1),
    bar_w(0x14, 1, 0xf), bar_r(0x14, 1),
])
put("virtio_pci_regs", "bringup", bringup)
# One read request: header at 0x20000, data at 0x21000, status at 0x22000.
req = b"".join([
    ram_w(0x1_0000, 0x2_0000), ram_w(0x1_0008, (1 << 32) * (1 | (1 << 16)) + 16),  # desc0: NEXT, next=1
    ram_w(0x1_0010, 0x2_1000), ram_w(0x1_0018, 512 | (2 << 32)),  # desc1: WRITE, next 0
    ram_w(0x2_0000, 0), ram_w(0x2_0008, 0),  # IN, sector 0
    ram_w(0x1_1000, 1 << 16),  # avail flags 0, idx 1, ring[0] = 0
    bar_w(0x3000, 2, 0), bar_r(0x1000, 1),
])
put("virtio_pci_regs", "bringup-request", bringup + req)
put("virtio_pci_regs", "bringup-reset", bringup + bar_w(0x14, 1, 0) + bar_r(0x14, 1) + bytes([7]) + bytes(11))
put("virtio_pci_regs", "queue-reset", bringup + bar_w(0x3a, 2, 1) + bar_r(0x3a, 2) + bar_w(0x1c, 2, 1))
# MSI-X enable through config space (cap offset found by the fuzzer; 0x40..0x80 typical).
put("virtio_pci_regs", "config-scan", b"".join(
    bytes([5]) + struct.pack("<HB", o, 2) + bytes(8) for o in range(0, 0x100, 4)))

# --- emudevd_config ----------------------------------------------------------------------
specs = [
    "virtio-blk,socket=/nonexistent/a.sock,backend=null,size=1G",
    "virtio-blk,socket=a.sock,path=disk.img,readonly=on,direct=on,num-queues=4,queue-size=256,serial=abc,id=d0",
    "testdev,socket=t.sock\ntestdev,socket=t.sock",
    "virtio-blk,socket=fd:3,backend=null,size=512M",
]
for i, s in enumerate(specs):
    put("emudevd_config", f"spec{i}", b"\x00" + s.encode())
lines = [
    '{"execute":"qmp_capabilities"}',
    '{"execute":"query-commands","id":1}',
    '{"execute":"query-devices","id":"x"}',
    '{"execute":"query-stats","arguments":{"format":"prometheus"}}',
    '{"execute":"query-stats","arguments":{"device":"nope","format":"json"}}',
    '{"execute":"device-del","arguments":{"id":"nope"}}',
    '{"execute":"set-link","arguments":{"name":"n","up":true}}',
    '{"execute":"device-add","arguments":{"spec":"testdev,socket=/nonexistent/x"}}',
    '{"execute":"device-add","arguments":{"type":"virtio-blk","socket":"/nonexistent/y","backend":"null","size":"1G","num-queues":2}}',
]
for i, s in enumerate(lines):
    put("emudevd_config", f"control{i}", b"\x01" + s.encode())
