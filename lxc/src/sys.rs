//! All liblxc FFI lives here, behind [`Container`], the safe owner of one `lxc_container`
//! reference. Every method checks that liblxc filled the function pointer it calls, converts
//! strings at the boundary, and the reference is dropped with `lxc_container_put`.
//!
//! liblxc's `struct lxc_container` is reference counted and locks itself (a process-shared
//! semaphore and a file lock) around the operations that need it, so one `Container` may be used
//! from one thread at a time (`Send`, not `Sync`).

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int};
use std::path::Path;
use std::ptr::NonNull;

use lxc_sys as ffi;

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("{what} contains a NUL byte")]
    Nul { what: &'static str },
    #[error("liblxc could not allocate container {name:?} in {lxcpath}")]
    New { name: String, lxcpath: String },
    #[error("this liblxc has no {0} operation")]
    Missing(&'static str),
}

/// One reference to a liblxc container object.
pub struct Container {
    ptr: NonNull<ffi::lxc_container>,
}

// SAFETY: liblxc container objects are not tied to the thread that created them; liblxc guards
// shared state with its own locks. `Container` is not `Sync`, so two threads never use one
// reference at the same time.
unsafe impl Send for Container {}

fn cstring(what: &'static str, s: &str) -> Result<CString, SysError> {
    CString::new(s).map_err(|_| SysError::Nul { what })
}

/// Calls one of the container's operations, failing cleanly if liblxc did not provide it.
macro_rules! op {
    ($self:ident, $name:ident $(, $arg:expr)*) => {{
        let raw = $self.ptr.as_ptr();
        // SAFETY: `raw` is a live container reference owned by `$self` (see `Container::new`);
        // reading the function-pointer field does not race with anything because liblxc fills
        // these pointers once, in `lxc_container_new`.
        let f = unsafe { (*raw).$name }.ok_or(SysError::Missing(stringify!($name)))?;
        // SAFETY: `f` is liblxc's implementation of this operation, called with the container
        // it belongs to and with arguments that stay alive for the duration of the call (the
        // callers keep every CString and buffer in scope until it returns).
        unsafe { f(raw $(, $arg)*) }
    }};
}

impl Container {
    /// A reference to container `name` under `lxcpath` (defined or not).
    pub fn new(name: &str, lxcpath: &Path) -> Result<Container, SysError> {
        let c_name = cstring("container name", name)?;
        let c_path = cstring("lxc path", &lxcpath.to_string_lossy())?;
        // SAFETY: both arguments are valid NUL-terminated strings that outlive the call;
        // liblxc copies them. A NULL result means allocation or config loading failed.
        let raw = unsafe { ffi::lxc_container_new(c_name.as_ptr(), c_path.as_ptr()) };
        NonNull::new(raw)
            .map(|ptr| Container { ptr })
            .ok_or_else(|| SysError::New {
                name: name.into(),
                lxcpath: lxcpath.display().to_string(),
            })
    }

    pub fn is_defined(&self) -> Result<bool, SysError> {
        Ok(op!(self, is_defined))
    }

    pub fn is_running(&self) -> Result<bool, SysError> {
        Ok(op!(self, is_running))
    }

    /// `STOPPED`, `STARTING`, `RUNNING`, `STOPPING`, `ABORTING`, `FREEZING`, `FROZEN`, `THAWED`.
    pub fn state(&self) -> Result<String, SysError> {
        let p = op!(self, state);
        if p.is_null() {
            return Ok("UNKNOWN".into());
        }
        // SAFETY: liblxc returns a pointer to a static state-name string, never freed.
        Ok(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }

    /// PID of the container's init in the host's PID namespace, or -1.
    pub fn init_pid(&self) -> Result<i32, SysError> {
        Ok(op!(self, init_pid))
    }

    pub fn clear_config(&self) -> Result<(), SysError> {
        op!(self, clear_config);
        Ok(())
    }

    pub fn set_config_item(&self, key: &str, value: &str) -> Result<bool, SysError> {
        let k = cstring("config key", key)?;
        let v = cstring("config value", value)?;
        Ok(op!(self, set_config_item, k.as_ptr(), v.as_ptr()))
    }

    /// Writes the configuration to the container's default config file.
    pub fn save_config(&self) -> Result<bool, SysError> {
        Ok(op!(self, save_config, std::ptr::null()))
    }

    pub fn load_config(&self) -> Result<bool, SysError> {
        Ok(op!(self, load_config, std::ptr::null()))
    }

    pub fn want_daemonize(&self, on: bool) -> Result<bool, SysError> {
        Ok(op!(self, want_daemonize, on))
    }

    /// Starts the container with `argv` as its program. With `useinit`, liblxc runs its minimal
    /// init (`init.lxc`) as PID 1, which forwards signals to the program and reaps orphans.
    /// When not daemonized this returns after the container stopped.
    pub fn start(&self, useinit: bool, argv: &[String]) -> Result<bool, SysError> {
        let owned: Vec<CString> = argv
            .iter()
            .map(|a| cstring("command argument", a))
            .collect::<Result<_, _>>()?;
        let mut ptrs: Vec<*mut c_char> = owned.iter().map(|c| c.as_ptr() as *mut c_char).collect();
        ptrs.push(std::ptr::null_mut());
        Ok(op!(self, start, useinit as c_int, ptrs.as_ptr()))
    }

    /// liblxc's error number from the last start: the program's exit code in execute mode.
    pub fn error_num(&self) -> i32 {
        // SAFETY: `ptr` is a live container reference; `error_num` is a plain int field that
        // only this thread's liblxc calls write.
        unsafe { (*self.ptr.as_ptr()).error_num }
    }

    /// Asks init to halt (`lxc.signal.halt`), waiting up to `timeout_s` seconds.
    pub fn shutdown(&self, timeout_s: i32) -> Result<bool, SysError> {
        Ok(op!(self, shutdown, timeout_s))
    }

    /// Kills the container (SIGKILL to init).
    pub fn stop(&self) -> Result<bool, SysError> {
        Ok(op!(self, stop))
    }

    pub fn freeze(&self) -> Result<bool, SysError> {
        Ok(op!(self, freeze))
    }

    pub fn unfreeze(&self) -> Result<bool, SysError> {
        Ok(op!(self, unfreeze))
    }

    pub fn destroy(&self) -> Result<bool, SysError> {
        Ok(op!(self, destroy))
    }

    /// Reads a cgroup file of the running container (`memory.current`, `pids.current`, ...).
    pub fn cgroup_item(&self, key: &str) -> Result<Option<String>, SysError> {
        let k = cstring("cgroup key", key)?;
        let mut buf = vec![0u8; 4096];
        let n = op!(
            self,
            get_cgroup_item,
            k.as_ptr(),
            buf.as_mut_ptr() as *mut c_char,
            buf.len() as c_int
        );
        if n < 0 {
            return Ok(None);
        }
        let n = (n as usize).min(buf.len());
        buf.truncate(n);
        let s = String::from_utf8_lossy(&buf);
        Ok(Some(s.trim_end_matches('\0').trim().to_string()))
    }

    /// Runs `argv` inside the running container with the caller's stdio, waits for it, and
    /// returns its wait status (or -1 when attaching failed).
    pub fn attach_run_wait(&self, argv: &[String], env: &[String]) -> Result<i32, SysError> {
        let owned: Vec<CString> = argv
            .iter()
            .map(|a| cstring("command argument", a))
            .collect::<Result<_, _>>()?;
        let mut ptrs: Vec<*const c_char> = owned.iter().map(|c| c.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        let env_owned: Vec<CString> = env
            .iter()
            .map(|e| cstring("environment entry", e))
            .collect::<Result<_, _>>()?;
        let mut env_ptrs: Vec<*mut c_char> = env_owned
            .iter()
            .map(|c| c.as_ptr() as *mut c_char)
            .collect();
        env_ptrs.push(std::ptr::null_mut());
        let mut opts = ffi::lxc_attach_options_t {
            attach_flags: ffi::LXC_ATTACH_DEFAULT as c_int,
            namespaces: -1,
            personality: -1,
            initial_cwd: std::ptr::null_mut(),
            uid: u32::MAX,
            gid: u32::MAX,
            env_policy: ffi::lxc_attach_env_policy_t_LXC_ATTACH_CLEAR_ENV,
            extra_env_vars: env_ptrs.as_mut_ptr(),
            extra_keep_env: std::ptr::null_mut(),
            stdin_fd: 0,
            stdout_fd: 1,
            stderr_fd: 2,
            log_fd: -libc::EBADF,
            lsm_label: std::ptr::null_mut(),
            groups: ffi::lxc_groups_t {
                size: 0,
                list: std::ptr::null_mut(),
            },
        };
        let program = owned
            .first()
            .map(|c| c.as_ptr())
            .unwrap_or(std::ptr::null());
        Ok(op!(
            self,
            attach_run_wait,
            &mut opts,
            program,
            ptrs.as_ptr()
        ))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SAFETY: `ptr` holds exactly one reference taken in `Container::new`; it is released
        // once, here, and never used again.
        unsafe {
            ffi::lxc_container_put(self.ptr.as_ptr());
        }
    }
}

/// liblxc's version string, e.g. `5.0.2`.
pub fn version() -> String {
    // SAFETY: lxc_get_version returns a pointer to a static string inside liblxc.
    let p = unsafe { ffi::lxc_get_version() };
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null, NUL-terminated and static (see above).
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}
