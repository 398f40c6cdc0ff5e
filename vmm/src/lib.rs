//! KVM microVM runtime (issue: vmm). Not implemented yet: this crate is an empty placeholder so the workspace layout is fixed.
