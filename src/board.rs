//! The board report as gatevisor prints it: board-support's probes plus what the supervisor's
//! own runtimes add (liblxc's version).

use gatevisor_board::{profile, BoardReport, ProfileError};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Clone, Serialize)]
pub struct FullReport {
    #[serde(flatten)]
    pub board: BoardReport,
    pub lxc_version: String,
    /// Runtimes this build of gatevisor can run services with.
    pub runtimes_available: Vec<crate::runtime::Kind>,
}

/// Picks the profile (`name`, or by DMI board name) and probes the board.
pub fn probe(name: Option<&str>, boards_dir: Option<&Path>) -> Result<FullReport, ProfileError> {
    let all = profile::load_all(boards_dir)?;
    let host = gatevisor_board::host::probe();
    let chosen = profile::select(&all, name, host.dmi_board_name.as_deref())?;
    let board = BoardReport::probe(chosen);
    Ok(FullReport {
        runtimes_available: crate::runtime::Kind::available(&board),
        board,
        lxc_version: gatevisor_lxc::version(),
    })
}
