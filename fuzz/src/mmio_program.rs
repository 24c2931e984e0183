//! The `virtio_mmio` target's input: a program of 8-byte operations on a virtio-mmio
//! transport, its guest memory and the host end of its device.
//!
//! The first input byte picks the device (even: virtio-rng, odd: virtio-console with a
//! buffer of `1 + byte * 64` bytes); the rest is a sequence of [`OP_LEN`]-byte operations,
//! each decoded by [`Op::decode`] (any 8 bytes are an operation) and run by [`run`].

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use capsule_devices::virtio::mmio::MmioTransport;
use capsule_devices::virtio::{HostEvent, VirtioDevice};
use capsule_devices::BusDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory size in bytes.
pub const MEM_SIZE: usize = 0x1_0000;
/// Bytes per operation.
pub const OP_LEN: usize = 8;
/// Register offsets are taken modulo this (the registers and some device configuration).
const REG_SPAN: u16 = 0x200;

/// One operation of a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Aligned 32-bit register write (the offset's low two bits are dropped).
    Write { offset: u16, value: u32 },
    /// Register write of `len` (1 to 8) bytes at any offset: `value` zero-extended.
    WriteBytes { offset: u16, len: u8, value: u32 },
    /// Register read of `len` (1 to 8) bytes.
    Read { offset: u16, len: u8 },
    /// A 32-bit write to guest memory at `addr` (4-byte aligned, below [`MEM_SIZE`]).
    Memory { addr: u32, value: u32 },
    /// The device processes queue `queue` (0 to 2), as after a notification.
    ProcessQueue { queue: u8 },
    /// The host end sends `data`, reads what is there, then the device sees a host event;
    /// `close` drops the host end (the console sees a hang-up).
    Host {
        data: [u8; 7],
        readable: bool,
        writable: bool,
        hangup: bool,
        close: bool,
    },
    /// Reads the interrupt status and acknowledges it.
    AckInterrupts,
}

fn le_u32(b: [u8; 4]) -> u32 {
    u32::from_le_bytes(b)
}

impl Op {
    /// Decodes one operation; every 8 bytes decode to one.
    pub fn decode(op: [u8; OP_LEN]) -> Op {
        let value = le_u32([op[4], op[5], op[6], op[7]]);
        let offset = u16::from_le_bytes([op[1], op[2]]) % REG_SPAN;
        let len = 1 + op[3] % 8;
        match op[0] % 8 {
            0 | 1 => Op::Write {
                offset: offset & !3,
                value,
            },
            2 => Op::WriteBytes { offset, len, value },
            3 => Op::Read { offset, len },
            4 => Op::Memory {
                addr: (u32::from(u16::from_le_bytes([op[1], op[2]])) << 2) % MEM_SIZE as u32,
                value,
            },
            5 => Op::ProcessQueue { queue: op[1] % 3 },
            6 => {
                let mut data = [0u8; 7];
                data.copy_from_slice(&op[1..]);
                Op::Host {
                    data,
                    readable: op[2] & 1 != 0,
                    writable: op[2] & 2 != 0,
                    hangup: op[2] & 4 != 0,
                    close: op[3] == 0xff,
                }
            }
            _ => Op::AckInterrupts,
        }
    }

    /// Encodes the operation so that [`Op::decode`] gives it back; `None` if a field is out
    /// of range or, for `Host`, if the flags disagree with `data` (they are read from its
    /// bytes 1 and 2).
    pub fn encode(&self) -> Option<[u8; OP_LEN]> {
        let reg = |offset: u16| (offset < REG_SPAN).then(|| offset.to_le_bytes());
        let mut op = [0u8; OP_LEN];
        match *self {
            Op::Write { offset, value } => {
                if offset % 4 != 0 {
                    return None;
                }
                op[1..3].copy_from_slice(&reg(offset)?);
                op[4..].copy_from_slice(&value.to_le_bytes());
            }
            Op::WriteBytes { offset, len, value } => {
                op[0] = 2;
                op[1..3].copy_from_slice(&reg(offset)?);
                op[3] = (1..=8).contains(&len).then(|| len - 1)?;
                op[4..].copy_from_slice(&value.to_le_bytes());
            }
            Op::Read { offset, len } => {
                op[0] = 3;
                op[1..3].copy_from_slice(&reg(offset)?);
                op[3] = (1..=8).contains(&len).then(|| len - 1)?;
            }
            Op::Memory { addr, value } => {
                if addr % 4 != 0 || addr as usize >= MEM_SIZE {
                    return None;
                }
                op[0] = 4;
                op[1..3].copy_from_slice(&((addr >> 2) as u16).to_le_bytes());
                op[4..].copy_from_slice(&value.to_le_bytes());
            }
            Op::ProcessQueue { queue } => {
                op[0] = 5;
                op[1] = (queue < 3).then_some(queue)?;
            }
            Op::Host { data, .. } => {
                op[0] = 6;
                op[1..].copy_from_slice(&data);
            }
            Op::AckInterrupts => op[0] = 7,
        }
        (Op::decode(op) == *self).then_some(op)
    }
}

/// Runs the operations in `ops` (a trailing partial operation is ignored) on `t`, whose
/// guest memory is `mem` and whose device's host end, if it has one, is `host`.
pub fn run<D: VirtioDevice>(
    t: &mut MmioTransport<D, GuestMemoryMmap<()>>,
    mem: &GuestMemoryMmap<()>,
    mut host: Option<UnixStream>,
    ops: &[u8],
) {
    for chunk in ops.chunks_exact(OP_LEN) {
        let mut op = [0u8; OP_LEN];
        op.copy_from_slice(chunk);
        match Op::decode(op) {
            Op::Write { offset, value } => {
                t.write(u64::from(offset), &value.to_le_bytes());
            }
            Op::WriteBytes { offset, len, value } => {
                let bytes = u64::from(value).to_le_bytes();
                t.write(u64::from(offset), &bytes[..usize::from(len)]);
            }
            Op::Read { offset, len } => {
                let mut data = [0u8; 8];
                t.read(u64::from(offset), &mut data[..usize::from(len)]);
            }
            Op::Memory { addr, value } => {
                let _ = mem.write_obj(value, GuestAddress(u64::from(addr)));
            }
            Op::ProcessQueue { queue } => t.process_queue(usize::from(queue)),
            Op::Host {
                data,
                readable,
                writable,
                hangup,
                close,
            } => {
                if let Some(h) = host.as_mut() {
                    let _ = h.write(&data);
                    let mut buf = [0u8; 256];
                    let _ = h.read(&mut buf);
                    if close {
                        host = None;
                    }
                }
                t.process_host(HostEvent {
                    readable,
                    writable,
                    hangup,
                });
            }
            Op::AckInterrupts => {
                let _ = t.irq_evt().read();
                let status = t.interrupt_status();
                t.write(0x64, &status.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_encodable_op_round_trips() {
        let ops = [
            Op::Write {
                offset: 0x70,
                value: 0xf,
            },
            Op::WriteBytes {
                offset: 0x101,
                len: 3,
                value: 0xabcdef,
            },
            Op::Read {
                offset: 0x1ff,
                len: 8,
            },
            Op::Memory {
                addr: 0xfffc,
                value: 7,
            },
            Op::ProcessQueue { queue: 2 },
            Op::Host {
                data: [b'h', 3, 0, 0, 0, 0, 0],
                readable: true,
                writable: true,
                hangup: false,
                close: false,
            },
            Op::AckInterrupts,
        ];
        for op in ops {
            assert_eq!(Op::decode(op.encode().unwrap()), op, "{op:?}");
        }
    }

    #[test]
    fn out_of_range_ops_do_not_encode() {
        assert_eq!(
            Op::Write {
                offset: 2,
                value: 0
            }
            .encode(),
            None
        );
        assert_eq!(
            Op::Read {
                offset: 0x200,
                len: 1
            }
            .encode(),
            None
        );
        assert_eq!(Op::Read { offset: 0, len: 9 }.encode(), None);
        assert_eq!(
            Op::Memory {
                addr: 0x1_0000,
                value: 0
            }
            .encode(),
            None
        );
        assert_eq!(Op::ProcessQueue { queue: 3 }.encode(), None);
        let flags_disagree = Op::Host {
            data: [0; 7],
            readable: true,
            writable: false,
            hangup: false,
            close: false,
        };
        assert_eq!(flags_disagree.encode(), None);
    }
}
