//! End-to-end scenarios on an emulated gateway booted in QEMU (issue: qemu-tests). Not implemented yet: empty placeholder.
