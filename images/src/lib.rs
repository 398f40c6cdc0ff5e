//! Signed service packages and the image store (issue: images). Not implemented yet: empty placeholder.
