//! Open vSwitch wiring and control-plane steering (issue: flowbridge). Not implemented yet: empty placeholder.
