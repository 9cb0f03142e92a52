//! Starting qmail-remote without copying the worker's descriptor table: the
//! child shares the worker's memory and descriptors until it drops all but
//! a few low staging descriptors, so the cost does not grow with the number
//! of deliveries the worker holds.

use std::ffi::{CStr, CString, OsStr, c_char, c_int, c_void};
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// Where the child's message (its future stdin) waits before the exec.
const STAGE_MESSAGE: RawFd = 3;
/// Where the child's output pipe (its future stdout and stderr) waits.
const STAGE_OUTPUT: RawFd = 4;
/// The first descriptor the child does not need.
const FIRST_UNNEEDED: u32 = 5;
/// The child runs a few raw system calls only.
const CHILD_STACK: usize = 64 * 1024;

/// The program to run for each delivery and where to look for it.
#[derive(Debug)]
pub struct Program {
    argv0: CString,
    /// Paths to try in order, as execvp would.
    paths: Vec<CString>,
}

impl Program {
    /// `$QMAILREMOTE` or `qmail-remote`, searched in `$PATH` unless it names
    /// a path.
    pub fn from_env() -> Self {
        let name = std::env::var_os("QMAILREMOTE").unwrap_or_else(|| "qmail-remote".into());
        let path = std::env::var_os("PATH").unwrap_or_else(|| "/bin:/usr/bin".into());
        Program::new(&name, &path)
    }

    fn new(name: &OsStr, search: &OsStr) -> Self {
        let argv0 = cstring(name.as_bytes());
        if name.as_bytes().contains(&b'/') {
            return Program {
                paths: vec![argv0.clone()],
                argv0,
            };
        }
        let paths = search
            .as_bytes()
            .split(|&b| b == b':')
            .map(|dir| {
                let mut full = if dir.is_empty() {
                    b".".to_vec()
                } else {
                    dir.to_vec()
                };
                full.push(b'/');
                full.extend_from_slice(name.as_bytes());
                cstring(&full)
            })
            .collect();
        Program { argv0, paths }
    }
}

fn cstring(bytes: &[u8]) -> CString {
    let clean: Vec<u8> = bytes.iter().copied().filter(|&b| b != 0).collect();
    CString::new(clean).unwrap_or_default()
}

/// Everything the child reads, prepared before the clone.
#[repr(C)]
struct ChildPlan {
    paths: *const *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
}

/// Starts children; owns the staging descriptors and the child stack.
pub struct Launcher {
    program: Program,
    path_ptrs: Vec<*const c_char>,
    stack: Vec<u128>,
    placeholder: OwnedFd,
}

impl Launcher {
    /// Reserve the staging descriptors: whatever is open there now is
    /// replaced, so this comes before the worker opens anything else.
    pub fn new(program: Program) -> io::Result<Self> {
        let null = std::fs::File::open("/dev/null")?;
        // The placeholder itself must stay clear of the staging numbers.
        let placeholder = null.as_fd().try_clone_to_owned().and_then(|fd| {
            // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor that we own.
            let moved = unsafe {
                libc::fcntl(
                    fd.as_raw_fd(),
                    libc::F_DUPFD_CLOEXEC,
                    FIRST_UNNEEDED as c_int,
                )
            };
            if moved == -1 {
                Err(io::Error::last_os_error())
            } else {
                Ok(moved)
            }
        })?;
        // SAFETY: `placeholder` is the descriptor fcntl just returned to us.
        let placeholder = unsafe { OwnedFd::from_raw_fd(placeholder) };
        drop(null);
        for fd in [STAGE_MESSAGE, STAGE_OUTPUT] {
            place(&placeholder, fd)?;
        }
        let mut path_ptrs: Vec<_> = program.paths.iter().map(|p| p.as_ptr()).collect();
        path_ptrs.push(std::ptr::null());
        let stack = vec![0u128; CHILD_STACK / 16];
        Ok(Launcher {
            program,
            path_ptrs,
            stack,
            placeholder,
        })
    }

    /// Run the program with `message` on stdin and `output` on stdout and
    /// stderr; returns its pid once it has called exec (or exited).
    pub fn spawn(
        &mut self,
        message: OwnedFd,
        output: OwnedFd,
        args: [&CStr; 3],
    ) -> io::Result<libc::pid_t> {
        place(&message, STAGE_MESSAGE)?;
        place(&output, STAGE_OUTPUT)?;
        drop((message, output));
        let result = self.clone_child(args);
        place(&self.placeholder, STAGE_MESSAGE)?;
        place(&self.placeholder, STAGE_OUTPUT)?;
        result
    }

    fn clone_child(&mut self, args: [&CStr; 3]) -> io::Result<libc::pid_t> {
        let argv = [
            self.program.argv0.as_ptr(),
            args[0].as_ptr(),
            args[1].as_ptr(),
            args[2].as_ptr(),
            std::ptr::null(),
        ];
        // SAFETY: reading the process environment pointer; nothing in the
        // worker changes the environment.
        let envp = unsafe { libc::environ } as *const *const c_char;
        let plan = ChildPlan {
            paths: self.path_ptrs.as_ptr(),
            argv: argv.as_ptr(),
            envp,
        };
        let top = self.stack.as_mut_ptr_range().end as *mut c_void;
        let flags = libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_FILES | libc::SIGCHLD;
        // SAFETY: the stack is ours, 16-byte aligned and unused by anything
        // else; with CLONE_VFORK this thread is suspended until the child has
        // called execve or _exit, so `plan`, `argv` and the strings they point
        // to stay alive and unchanged for as long as the child reads them, and
        // the child only makes raw system calls (see `child_main`).
        let pid = unsafe {
            libc::clone(
                child_main,
                top,
                flags,
                &plan as *const ChildPlan as *mut c_void,
            )
        };
        if pid == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(pid)
        }
    }
}

/// Put a copy of `fd` at descriptor number `at`, closed on exec.
fn place(fd: &OwnedFd, at: RawFd) -> io::Result<()> {
    // SAFETY: dup3 onto a number this module reserves for itself; both
    // descriptors are valid.
    let r = unsafe { libc::dup3(fd.as_raw_fd(), at, libc::O_CLOEXEC) };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The child, between clone and exec. It runs on its own stack in the
/// worker's memory while the worker waits, so it must not allocate, lock or
/// unwind: raw system calls only.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` points to the ChildPlan that `clone_child` keeps alive
    // until this child execs or exits.
    let plan = unsafe { &*(arg as *const ChildPlan) };
    // SAFETY: each call below is a plain system call on descriptors and
    // memory prepared by the parent; CLOSE_RANGE_UNSHARE first gives the
    // child its own descriptor table (copying only descriptors 0 to 4), so
    // the dup2 calls after it cannot touch the worker's descriptors.
    unsafe {
        if libc::close_range(FIRST_UNNEEDED, u32::MAX, libc::CLOSE_RANGE_UNSHARE as c_int) != 0
            || libc::dup2(STAGE_MESSAGE, 0) == -1
            || libc::dup2(STAGE_OUTPUT, 1) == -1
            || libc::dup2(1, 2) == -1
        {
            libc::_exit(111);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        let errno = exec_first(plan);
        libc::_exit(if temporary(errno) { 111 } else { 100 })
    }
}

/// Try each path as execvp does; returns the errno that ends the search.
///
/// # Safety
/// The plan's arrays must be NUL-pointer terminated and valid.
unsafe fn exec_first(plan: &ChildPlan) -> c_int {
    let mut errno = libc::ENOENT;
    let mut denied = false;
    let mut at = plan.paths;
    // SAFETY: the caller guarantees the arrays are terminated and valid.
    unsafe {
        while !(*at).is_null() {
            libc::execve(*at, plan.argv, plan.envp);
            errno = *libc::__errno_location();
            match errno {
                libc::EACCES => denied = true,
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => return errno,
            }
            at = at.add(1);
        }
    }
    if denied { libc::EACCES } else { errno }
}

/// The errors qmail treats as temporary when it cannot run a program.
fn temporary(errno: c_int) -> bool {
    matches!(
        errno,
        libc::EINTR
            | libc::ENOMEM
            | libc::ETXTBSY
            | libc::EIO
            | libc::ETIMEDOUT
            | libc::EAGAIN
            | libc::EDEADLK
            | libc::EBUSY
            | libc::ENFILE
            | libc::EMFILE
            | libc::EFBIG
            | libc::ENOSPC
            | libc::ENETDOWN
            | libc::ENETUNREACH
            | libc::ENETRESET
            | libc::ECONNABORTED
            | libc::ECONNRESET
            | libc::ENOBUFS
            | libc::ETOOMANYREFS
            | libc::ECONNREFUSED
            | libc::EHOSTDOWN
            | libc::EHOSTUNREACH
            | libc::EUSERS
            | libc::EDQUOT
            | libc::ESTALE
            | libc::ENOLCK
    )
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt;

    use super::*;

    fn describe(program: &Program) -> Vec<OsString> {
        program
            .paths
            .iter()
            .map(|p| OsString::from_vec(p.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn searches_path_like_execvp() {
        let p = Program::new(OsStr::new("qmail-remote"), OsStr::new("/a::/b"));
        assert_eq!(
            describe(&p),
            ["/a/qmail-remote", "./qmail-remote", "/b/qmail-remote"]
        );
        assert_eq!(p.argv0.as_bytes(), b"qmail-remote");
        let p = Program::new(OsStr::new("/x/remote"), OsStr::new("/a"));
        assert_eq!(describe(&p), ["/x/remote"]);
    }
}
