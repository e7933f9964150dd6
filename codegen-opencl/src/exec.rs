//! The executor (feature `opencl`): probing, device buffers, program building with a cache,
//! and kernel launches through the `ocl` crate.
//!
//! `unsafe` lives in two places, each behind checks: the raw `clGetPlatformIDs` count in
//! [`probe`], and the kernel enqueue in [`OpenClKernel`]'s `run`, which happens only after
//! [`Args::check`] has checked every buffer length against the spec and every index the
//! kernels compute has been checked to fit an `int`.

use std::collections::HashMap;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use ocl::core::ffi;
use ocl::enums::{DeviceInfo as ClDeviceInfo, DeviceInfoResult, ProfilingInfo};
use ocl::flags::{CommandQueueProperties, DeviceType};
use ocl::{Buffer, Context, Device, Event, Platform, Program, Queue};
use sparse_ir::backend::{Args, Backend, BackendError, BufferLen, CacheKey, Kernel, Launch};
use sparse_ir::{KernelSpec, Role, Strategy};

use crate::device::{select_device, DeviceInfo, DeviceKind, DeviceProfile, DEVICE_ENV};
use crate::emit::{
    csr_library, emit, largest_features, EmitOptions, KernelArg, KernelEntry, Operand,
};
use crate::plan::{plan, KernelLifetime};

/// `CL_PLATFORM_NOT_FOUND_KHR`: what the ICD loader returns when no platform is installed.
const CL_PLATFORM_NOT_FOUND_KHR: i32 = -1001;

fn device_err(context: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError::Device(format!("{context}: {e}"))
}

/// The number of OpenCL platforms, from one raw `clGetPlatformIDs` call (no retry loop).
fn platform_count() -> Result<u32, BackendError> {
    let mut count: ffi::cl_uint = 0;
    // SAFETY: with `num_entries = 0` and a null platform list, clGetPlatformIDs only writes
    // the number of platforms through `num_platforms`, which points to a live `cl_uint`.
    let status = unsafe { ffi::clGetPlatformIDs(0, ptr::null_mut(), &mut count) };
    match status {
        0 => Ok(count),
        CL_PLATFORM_NOT_FOUND_KHR => Ok(0),
        s => Err(BackendError::Device(format!(
            "clGetPlatformIDs failed with status {s}"
        ))),
    }
}

/// Lists every OpenCL device of every platform.
///
/// With no platform, or no device on any platform, it returns
/// [`BackendError::NoPlatform`] at once: the platform count comes from a raw
/// `clGetPlatformIDs` call, without the retry loop (and the panic) of
/// `ocl::Platform::list`.
pub fn probe() -> Result<Vec<DeviceInfo>, BackendError> {
    if platform_count()? == 0 {
        return Err(BackendError::NoPlatform);
    }
    let ids = ocl::core::get_platform_ids().map_err(|e| device_err("listing platforms", e))?;
    let mut out = Vec::new();
    for (platform_index, id) in ids.into_iter().enumerate() {
        let platform = Platform::new(id);
        let platform_name = platform.name().unwrap_or_default();
        let devices = Device::list_all(platform).map_err(|e| device_err("listing devices", e))?;
        for (device_index, device) in devices.into_iter().enumerate() {
            out.push(describe(
                platform_index,
                device_index,
                &platform_name,
                device,
            )?);
        }
    }
    if out.is_empty() {
        return Err(BackendError::NoPlatform);
    }
    Ok(out)
}

fn describe(
    platform_index: usize,
    device_index: usize,
    platform: &str,
    device: Device,
) -> Result<DeviceInfo, BackendError> {
    let info = |kind: ClDeviceInfo| {
        device
            .info(kind)
            .map_err(|e| device_err(&format!("querying {kind:?}"), e))
    };
    let kind = match info(ClDeviceInfo::Type)? {
        DeviceInfoResult::Type(t) if t.contains(DeviceType::CPU) => DeviceKind::Cpu,
        DeviceInfoResult::Type(t) if t.contains(DeviceType::GPU) => DeviceKind::Gpu,
        _ => DeviceKind::Other,
    };
    let compute_units = match info(ClDeviceInfo::MaxComputeUnits)? {
        DeviceInfoResult::MaxComputeUnits(n) => n as usize,
        _ => 1,
    };
    let max_work_group_size = match info(ClDeviceInfo::MaxWorkGroupSize)? {
        DeviceInfoResult::MaxWorkGroupSize(n) => n,
        _ => 1,
    };
    let max_constant_buffer_size = match info(ClDeviceInfo::MaxConstantBufferSize)? {
        DeviceInfoResult::MaxConstantBufferSize(n) => n as usize,
        _ => 64 << 10,
    };
    let global_mem_size = match info(ClDeviceInfo::GlobalMemSize)? {
        DeviceInfoResult::GlobalMemSize(n) => n,
        _ => 0,
    };
    let version = match info(ClDeviceInfo::Version)? {
        DeviceInfoResult::Version(v) => v.to_string(),
        other => other.to_string(),
    };
    Ok(DeviceInfo {
        platform_index,
        device_index,
        platform: platform.trim().to_string(),
        name: device.name().unwrap_or_default().trim().to_string(),
        vendor: device.vendor().unwrap_or_default().trim().to_string(),
        version,
        kind,
        compute_units,
        max_work_group_size,
        max_constant_buffer_size,
        global_mem_size,
    })
}

/// Counters of one backend, since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Kernel launches.
    pub launches: u64,
    /// Device time of every kernel launch (profiling events: no host transfers).
    pub kernel_ns: u64,
    /// Host time of uploads and downloads.
    pub transfer_ns: u64,
    /// Bytes uploaded (buffers and index arrays).
    pub bytes_up: u64,
    /// Bytes downloaded.
    pub bytes_down: u64,
    /// Programs built (cache misses).
    pub programs_built: u64,
    /// Host time of those builds.
    pub build_ns: u64,
}

/// A buffer of `f32` on the device. It stays there until dropped; [`Backend::upload`] and
/// [`Backend::download`] copy to and from the host.
#[derive(Debug)]
pub struct DeviceBuffer {
    pub(crate) buffer: Buffer<f32>,
    len: usize,
    backend_id: u64,
}

impl DeviceBuffer {
    /// Number of `f32` elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl BufferLen for DeviceBuffer {
    fn len_f32(&self) -> usize {
        self.len
    }
}

/// A buffer of `u32` on the device (labels, index maps), for the training kernels.
/// [`OpenClBackend::upload_indices`] fills it; the kernels that read it guard every index.
#[derive(Debug)]
pub struct IndexBuffer {
    pub(crate) buffer: Buffer<u32>,
    len: usize,
    backend_id: u64,
}

impl IndexBuffer {
    /// Number of `u32` elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// How a kernel was compiled and what it cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileReport {
    /// The strategy that runs (never `Auto`).
    pub strategy: Strategy,
    /// The planner's reason for it, or `asked for`.
    pub reason: String,
    /// Host time generating the source.
    pub emit: Duration,
    /// Host time building programs not in the cache (`clBuildProgram`), uploading index
    /// arrays and creating kernels.
    pub build: Duration,
    /// Host time of the first launch on zero-filled scratch buffers (PoCL compiles each
    /// kernel for the device only when it is first launched).
    pub first_launch: Duration,
    /// Programs the kernel runs from.
    pub programs: usize,
    /// Of those, how many were built now (the rest came from the program cache).
    pub programs_built: usize,
    /// Kernels launched per run.
    pub kernels: usize,
    /// Bytes of OpenCL C source.
    pub source_bytes: usize,
    /// Whether the whole kernel came from the kernel cache (no time spent).
    pub cached: bool,
}

impl CompileReport {
    /// The compile time: emit + build + first launch.
    pub fn compile_time(&self) -> Duration {
        self.emit + self.build + self.first_launch
    }
}

static NEXT_BACKEND_ID: AtomicU64 = AtomicU64::new(1);

struct Inner {
    id: u64,
    info: DeviceInfo,
    profile: DeviceProfile,
    opts: EmitOptions,
    device: Device,
    context: Context,
    queue: Queue,
    /// Built programs by source hash; weak, so a program is freed with its last kernel.
    programs: Mutex<HashMap<u64, Weak<Program>>>,
    /// The generic program, built at most once and kept for the backend's life.
    csr: Mutex<Option<Arc<Program>>>,
    /// The hash of the generic program's source.
    csr_hash: u64,
    /// Compiled kernels by cache key; weak for the same reason.
    kernels: Mutex<HashMap<CacheKey, Weak<Compiled>>>,
    stats: Mutex<Stats>,
    /// How long the kernels `Auto` plans will run before their pattern changes.
    lifetime: Mutex<KernelLifetime>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the maps inconsistent (every
    // update is a single insert), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The OpenCL backend on one device: device buffers, a program cache and a kernel cache.
///
/// Kernel caching follows CONTRACTS.md: compiled kernels are keyed by
/// [`CacheKey`] (device, op with its epilogue, pattern hash, batch, `ld`, strategy), and
/// programs by the hash of their source, so the generic `csr` program is built once per
/// device and an unchanged pattern is never rebuilt while a kernel using it lives.
#[derive(Clone)]
pub struct OpenClBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for OpenClBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenClBackend")
            .field("device", &self.inner.info.describe())
            .finish()
    }
}

impl OpenClBackend {
    /// A backend on the first device that [`probe`] lists.
    pub fn first() -> Result<Self, BackendError> {
        let devices = probe()?;
        Self::new(&devices[0])
    }

    /// A backend on the device a program should use by default: the one at index
    /// `SPARSEJIT_OPENCL_DEVICE` of [`probe`]'s list when that variable is set, otherwise the
    /// first GPU (or other non-CPU device), otherwise the first device. On a machine with
    /// both PoCL and a GPU driver this picks the GPU.
    pub fn preferred() -> Result<Self, BackendError> {
        let devices = probe()?;
        Self::new(select_device(
            &devices,
            std::env::var(DEVICE_ENV).ok().as_deref(),
        )?)
    }

    /// A backend on a device that [`probe`] listed.
    pub fn new(info: &DeviceInfo) -> Result<Self, BackendError> {
        let ids = ocl::core::get_platform_ids().map_err(|e| device_err("listing platforms", e))?;
        let id = *ids
            .get(info.platform_index)
            .ok_or_else(|| BackendError::Device(format!("no platform {}", info.platform_index)))?;
        let platform = Platform::new(id);
        let devices = Device::list_all(platform).map_err(|e| device_err("listing devices", e))?;
        let device = *devices.get(info.device_index).ok_or_else(|| {
            BackendError::Device(format!(
                "platform {} has no device {}",
                info.platform_index, info.device_index
            ))
        })?;
        let context = Context::builder()
            .platform(platform)
            .devices(device)
            .build()
            .map_err(|e| device_err("creating a context", e))?;
        let queue = Queue::new(
            &context,
            device,
            Some(CommandQueueProperties::PROFILING_ENABLE),
        )
        .map_err(|e| device_err("creating a queue", e))?;
        Ok(OpenClBackend {
            inner: Arc::new(Inner {
                id: NEXT_BACKEND_ID.fetch_add(1, Ordering::Relaxed),
                profile: info.profile(),
                info: info.clone(),
                opts: EmitOptions::default(),
                device,
                context,
                queue,
                programs: Mutex::new(HashMap::new()),
                csr: Mutex::new(None),
                csr_hash: xxhash_rust::xxh3::xxh3_64(csr_library(&info.profile()).as_bytes()),
                kernels: Mutex::new(HashMap::new()),
                stats: Mutex::new(Stats::default()),
                lifetime: Mutex::new(KernelLifetime::default()),
            }),
        })
    }

    /// The same device with other emitter limits (a fresh backend: caches are not shared).
    pub fn with_options(&self, opts: EmitOptions) -> Result<Self, BackendError> {
        let mut fresh = Self::new(&self.inner.info)?;
        Arc::get_mut(&mut fresh.inner)
            .expect("a fresh backend has one owner")
            .opts = opts;
        Ok(fresh)
    }

    /// The device.
    pub fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    /// The device's profile (what the code is shaped for).
    pub fn profile(&self) -> DeviceProfile {
        self.inner.profile
    }

    /// The emitter limits.
    pub fn options(&self) -> EmitOptions {
        self.inner.opts
    }

    /// What `Auto` means for `spec` on this device, and why (for kernels that live as long
    /// as [`OpenClBackend::kernel_lifetime`] says).
    pub fn plan(&self, spec: &KernelSpec) -> crate::plan::Plan {
        plan(
            spec,
            &self.inner.profile,
            &self.inner.opts,
            self.kernel_lifetime(),
        )
    }

    /// How long the kernels that `Auto` plans from now on will run before their pattern
    /// changes ([`KernelLifetime::Lasting`] by default: the fastest kernel). Training sets
    /// the steps between mask updates, so that a CPU device does not build a program per
    /// pattern that an epoch cannot repay. Shared by every clone of this backend.
    pub fn set_kernel_lifetime(&self, lifetime: KernelLifetime) {
        *lock(&self.inner.lifetime) = lifetime;
    }

    /// The lifetime the planner assumes ([`OpenClBackend::set_kernel_lifetime`]).
    pub fn kernel_lifetime(&self) -> KernelLifetime {
        *lock(&self.inner.lifetime)
    }

    /// Counters since the backend was created.
    pub fn stats(&self) -> Stats {
        *lock(&self.inner.stats)
    }

    /// Programs currently alive in the program cache.
    pub fn cached_programs(&self) -> usize {
        lock(&self.inner.programs)
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }

    /// A zero-filled device buffer of `len` indices.
    pub fn alloc_indices(&self, len: usize) -> Result<IndexBuffer, BackendError> {
        Ok(IndexBuffer {
            buffer: self.zeroed(len, "indices")?,
            len,
            backend_id: self.inner.id,
        })
    }

    /// Copies `data` into `buffer`, whose length it must have.
    pub fn upload_indices(
        &self,
        data: &[u32],
        buffer: &mut IndexBuffer,
    ) -> Result<(), BackendError> {
        self.write(buffer.backend_id, buffer.len, &buffer.buffer, data)
    }

    /// A zero-filled buffer of `len` elements (at least one: OpenCL has no empty buffers).
    fn zeroed<T: ocl::OclPrm>(&self, len: usize, what: &str) -> Result<Buffer<T>, BackendError> {
        Buffer::<T>::builder()
            .queue(self.inner.queue.clone())
            .len(len.max(1))
            .fill_val(T::default())
            .build()
            .map_err(|e| device_err(&format!("allocating {len} {what}"), e))
    }

    /// Copies `data` into a buffer of this backend (`backend_id`) holding `len` elements,
    /// counting the time and bytes in [`Stats`].
    fn write<T: ocl::OclPrm>(
        &self,
        backend_id: u64,
        len: usize,
        buffer: &Buffer<T>,
        data: &[T],
    ) -> Result<(), BackendError> {
        self.check_owner(backend_id, "upload")?;
        Self::transfer_len_check("upload", len, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        buffer
            .write(data)
            .enq()
            .map_err(|e| device_err("upload", e))?;
        let mut stats = lock(&self.inner.stats);
        stats.transfer_ns += t.elapsed().as_nanos() as u64;
        stats.bytes_up += std::mem::size_of_val(data) as u64;
        Ok(())
    }

    /// Builds a program that does not come from a kernel spec (the training program),
    /// counting it in [`Stats`]; `what` names it in errors.
    pub(crate) fn build_program(&self, source: &str, what: &str) -> Result<Program, BackendError> {
        let t = Instant::now();
        let program = Program::builder()
            .devices(self.inner.device)
            .src(source)
            .build(&self.inner.context)
            .map_err(|e| BackendError::Device(format!("building {what}: {e}")))?;
        let mut stats = lock(&self.inner.stats);
        stats.programs_built += 1;
        stats.build_ns += t.elapsed().as_nanos() as u64;
        Ok(program)
    }

    /// The command queue every kernel and transfer of this backend goes through.
    pub(crate) fn queue(&self) -> &Queue {
        &self.inner.queue
    }

    /// Waits for the queue, then adds the device time of `events` (profiling) and their
    /// number to [`Stats`]; returns that time in nanoseconds. `what` names the caller in
    /// errors.
    pub(crate) fn finish_and_record(
        &self,
        events: &[Event],
        what: &str,
    ) -> Result<u64, BackendError> {
        let internal = |m: String| BackendError::Device(format!("{what}: {m}"));
        self.inner
            .queue
            .finish()
            .map_err(|e| internal(format!("waiting for the kernels: {e}")))?;
        let mut ns = 0u64;
        for event in events {
            let time = |which| {
                event
                    .profiling_info(which)
                    .and_then(|r| r.time().map_err(Into::into))
                    .map_err(|e| internal(format!("profiling: {e}")))
            };
            ns += time(ProfilingInfo::End)?.saturating_sub(time(ProfilingInfo::Start)?);
        }
        let mut stats = lock(&self.inner.stats);
        stats.launches += events.len() as u64;
        stats.kernel_ns += ns;
        Ok(ns)
    }

    pub(crate) fn check_own(&self, buffer: &DeviceBuffer, what: &str) -> Result<(), BackendError> {
        self.check_owner(buffer.backend_id, what)
    }

    pub(crate) fn check_own_indices(
        &self,
        buffer: &IndexBuffer,
        what: &str,
    ) -> Result<(), BackendError> {
        self.check_owner(buffer.backend_id, what)
    }

    fn check_owner(&self, backend_id: u64, what: &str) -> Result<(), BackendError> {
        if backend_id != self.inner.id {
            return Err(BackendError::Device(format!(
                "{what}: the buffer belongs to another OpenCL backend"
            )));
        }
        Ok(())
    }

    fn transfer_len_check(
        op: &'static str,
        expected: usize,
        got: usize,
    ) -> Result<(), BackendError> {
        if expected != got {
            return Err(BackendError::Length {
                layer: "-".into(),
                op,
                operand: "host data",
                rule: "the buffer's length",
                expected,
                got,
            });
        }
        Ok(())
    }

    /// A buffer of `u32` holding `data` (at least one element: OpenCL has no empty buffers).
    fn upload_u32(&self, data: &[u32]) -> Result<Buffer<u32>, BackendError> {
        let padded;
        let slice = if data.is_empty() {
            padded = [0u32];
            &padded[..]
        } else {
            data
        };
        let t = Instant::now();
        let buffer = Buffer::<u32>::builder()
            .queue(self.inner.queue.clone())
            .len(slice.len())
            .copy_host_slice(slice)
            .build()
            .map_err(|e| device_err("uploading an index array", e))?;
        let mut stats = lock(&self.inner.stats);
        stats.transfer_ns += t.elapsed().as_nanos() as u64;
        stats.bytes_up += 4 * slice.len() as u64;
        Ok(buffer)
    }

    /// The built program for `source`, from the cache or built now (`built` counts builds).
    fn program(
        &self,
        spec: &KernelSpec,
        source: &crate::emit::ProgramSource,
        built: &mut usize,
    ) -> Result<Arc<Program>, BackendError> {
        let key = source.hash();
        let is_csr = key == self.inner.csr_hash;
        if is_csr {
            if let Some(p) = lock(&self.inner.csr).as_ref() {
                return Ok(p.clone());
            }
        }
        if let Some(p) = lock(&self.inner.programs).get(&key).and_then(Weak::upgrade) {
            return Ok(p);
        }
        let t = Instant::now();
        let program = Program::builder()
            .devices(self.inner.device)
            .src(source.source.clone())
            .build(&self.inner.context)
            .map_err(|e| BackendError::Compile {
                layer: spec.layer().to_string(),
                op: spec.op().name(),
                message: e.to_string(),
            })?;
        let program = Arc::new(program);
        {
            let mut stats = lock(&self.inner.stats);
            stats.programs_built += 1;
            stats.build_ns += t.elapsed().as_nanos() as u64;
        }
        *built += 1;
        let mut programs = lock(&self.inner.programs);
        programs.retain(|_, w| w.strong_count() > 0);
        programs.insert(key, Arc::downgrade(&program));
        if is_csr {
            *lock(&self.inner.csr) = Some(program.clone());
        }
        Ok(program)
    }

    /// Runs `kernel` once on zero-filled scratch buffers, so that a lazily compiling
    /// platform (PoCL) compiles every kernel now rather than at the first real launch.
    fn first_launch(&self, kernel: &OpenClKernel) -> Result<(), BackendError> {
        let spec = &kernel.spec;
        let p = spec.pattern();
        let batch = match spec.batch() {
            sparse_ir::Dim::Fixed(b) => b,
            sparse_ir::Dim::Any => 1,
        };
        let ld = match spec.ld() {
            sparse_ir::Dim::Fixed(l) => l,
            sparse_ir::Dim::Any => batch,
        };
        let launch = Launch::new(batch, ld);
        let (rows, cols) = (spec.out_features() * ld, spec.in_features() * ld);
        match spec.op().role() {
            Role::Forward => {
                let bias = spec.op().has_bias();
                let values = self.alloc(p.nnz())?;
                let x = self.alloc(cols)?;
                let b = if bias {
                    Some(self.alloc(p.rows())?)
                } else {
                    None
                };
                let mut y = self.alloc(rows)?;
                kernel.run(
                    launch,
                    Args::Spmm {
                        values: &values,
                        x: &x,
                        bias: b.as_ref(),
                        y: &mut y,
                    },
                )
            }
            Role::BackwardData => {
                let values = self.alloc(p.nnz())?;
                let dy = self.alloc(rows)?;
                let mut dx = self.alloc(cols)?;
                kernel.run(
                    launch,
                    Args::SpmmT {
                        values: &values,
                        dy: &dy,
                        dx: &mut dx,
                    },
                )
            }
            Role::WeightGrad => {
                let dy = self.alloc(rows)?;
                let x = self.alloc(cols)?;
                let mut dw = self.alloc(p.nnz())?;
                kernel.run(
                    launch,
                    Args::Sddmm {
                        dy: &dy,
                        x: &x,
                        dw: &mut dw,
                    },
                )
            }
            Role::DenseGrad => {
                let dy = self.alloc(rows)?;
                let x = self.alloc(cols)?;
                let mut grad = self.alloc(p.rows() * p.cols())?;
                kernel.run(
                    launch,
                    Args::DenseGrad {
                        dy: &dy,
                        x: &x,
                        grad: &mut grad,
                    },
                )
            }
        }
    }
}

impl Backend for OpenClBackend {
    type Kernel = OpenClKernel;
    type Buffer = DeviceBuffer;

    fn name(&self) -> &'static str {
        "opencl"
    }

    fn device(&self) -> String {
        self.inner.info.describe()
    }

    fn alloc(&self, len: usize) -> Result<DeviceBuffer, BackendError> {
        Ok(DeviceBuffer {
            buffer: self.zeroed(len, "floats")?,
            len,
            backend_id: self.inner.id,
        })
    }

    fn upload(&self, data: &[f32], buffer: &mut DeviceBuffer) -> Result<(), BackendError> {
        self.write(buffer.backend_id, buffer.len, &buffer.buffer, data)
    }

    fn download(&self, buffer: &DeviceBuffer, out: &mut [f32]) -> Result<(), BackendError> {
        self.check_own(buffer, "download")?;
        Self::transfer_len_check("download", buffer.len, out.len())?;
        if out.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        buffer
            .buffer
            .read(&mut *out)
            .enq()
            .map_err(|e| device_err("download", e))?;
        let mut stats = lock(&self.inner.stats);
        stats.transfer_ns += t.elapsed().as_nanos() as u64;
        stats.bytes_down += 4 * out.len() as u64;
        Ok(())
    }

    fn compile(&self, spec: &KernelSpec, strategy: Strategy) -> Result<OpenClKernel, BackendError> {
        let t0 = Instant::now();
        let (strategy, reason) = match strategy {
            Strategy::Auto => {
                let p = self.plan(spec);
                (p.strategy, p.reason)
            }
            s => (s, "asked for".to_string()),
        };
        let key = CacheKey::new(self.device(), spec, strategy);
        let hit = lock(&self.inner.kernels).get(&key).and_then(Weak::upgrade);
        if let Some(compiled) = hit {
            let report = CompileReport {
                reason,
                emit: Duration::ZERO,
                build: Duration::ZERO,
                first_launch: Duration::ZERO,
                programs_built: 0,
                cached: true,
                ..compiled.report.clone()
            };
            return Ok(OpenClKernel {
                spec: spec.clone(),
                compiled,
                backend: self.clone(),
                report,
            });
        }
        let emitted = emit(spec, strategy, &self.inner.profile, &self.inner.opts)?;
        let emit_time = t0.elapsed();
        let t1 = Instant::now();
        let mut built = 0;
        let arrays = emitted
            .arrays
            .iter()
            .map(|a| self.upload_u32(&a.data))
            .collect::<Result<Vec<_>, _>>()?;
        let mut programs = Vec::with_capacity(emitted.programs.len());
        let mut units = Vec::new();
        for source in &emitted.programs {
            let program = self.program(spec, source, &mut built)?;
            for entry in &source.kernels {
                let kernel = self.create_kernel(spec, &program, entry, &arrays)?;
                units.push(Unit {
                    kernel,
                    entry: entry.clone(),
                });
            }
            programs.push(program);
        }
        let build = t1.elapsed();
        let report = CompileReport {
            strategy,
            reason,
            emit: emit_time,
            build,
            first_launch: Duration::ZERO,
            programs: emitted.programs.len(),
            programs_built: built,
            kernels: units.len(),
            source_bytes: emitted.source_bytes(),
            cached: false,
        };
        let compiled = Arc::new(Compiled {
            strategy,
            units: Mutex::new(units),
            _arrays: arrays,
            _programs: programs,
            report: report.clone(),
            last_ns: AtomicU64::new(0),
        });
        let mut kernel = OpenClKernel {
            spec: spec.clone(),
            compiled,
            backend: self.clone(),
            report,
        };
        let t2 = Instant::now();
        self.first_launch(&kernel)?;
        kernel.report.first_launch = t2.elapsed();
        let mut kernels = lock(&self.inner.kernels);
        kernels.retain(|_, w| w.strong_count() > 0);
        kernels.insert(key, Arc::downgrade(&kernel.compiled));
        Ok(kernel)
    }
}

impl OpenClBackend {
    fn create_kernel(
        &self,
        spec: &KernelSpec,
        program: &Program,
        entry: &KernelEntry,
        arrays: &[Buffer<u32>],
    ) -> Result<ocl::Kernel, BackendError> {
        let mut builder = ocl::Kernel::builder();
        builder
            .program(program)
            .name(entry.name.clone())
            .queue(self.inner.queue.clone());
        for arg in &entry.args {
            match *arg {
                KernelArg::Operand(_) => {
                    builder.arg(None::<&Buffer<f32>>);
                }
                KernelArg::Array(i) => {
                    let array = arrays.get(i).ok_or_else(|| {
                        BackendError::Device(format!("{}: no index array {i}", entry.name))
                    })?;
                    builder.arg(array);
                }
                KernelArg::Batch | KernelArg::Ld => {
                    builder.arg(0i32);
                }
                KernelArg::Int(v) => {
                    builder.arg(v);
                }
            }
        }
        builder.build().map_err(|e| BackendError::Compile {
            layer: spec.layer().to_string(),
            op: spec.op().name(),
            message: format!("creating kernel {}: {e}", entry.name),
        })
    }
}

/// One kernel of a compiled spec and how to launch it.
struct Unit {
    kernel: ocl::Kernel,
    entry: KernelEntry,
}

/// What a compiled spec shares between the [`OpenClKernel`]s that the cache hands out.
struct Compiled {
    strategy: Strategy,
    /// The kernels, launched in order; the lock makes setting arguments and enqueueing one
    /// launch atomic.
    units: Mutex<Vec<Unit>>,
    /// Index arrays the kernels' arguments point to (kept alive with them).
    _arrays: Vec<Buffer<u32>>,
    /// Programs the kernels come from (kept alive, so the program cache can share them).
    _programs: Vec<Arc<Program>>,
    report: CompileReport,
    /// Device time of the last run, in nanoseconds.
    last_ns: AtomicU64,
}

/// A compiled kernel on an [`OpenClBackend`].
pub struct OpenClKernel {
    spec: KernelSpec,
    compiled: Arc<Compiled>,
    backend: OpenClBackend,
    report: CompileReport,
}

impl std::fmt::Debug for OpenClKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenClKernel")
            .field("layer", &self.spec.layer())
            .field("op", &self.spec.op())
            .field("strategy", &self.compiled.strategy)
            .finish()
    }
}

impl OpenClKernel {
    /// How it was compiled and what that cost.
    pub fn report(&self) -> &CompileReport {
        &self.report
    }

    /// Device time of the kernels of the last run (no host transfers), from profiling events.
    pub fn last_kernel_time(&self) -> Duration {
        Duration::from_nanos(self.compiled.last_ns.load(Ordering::Relaxed))
    }

    /// Checks that every index the kernels compute fits an `int` at this launch.
    fn check_int_range(&self, launch: Launch) -> Result<(), BackendError> {
        let largest = largest_features(&self.spec).saturating_mul(launch.ld);
        if i32::try_from(largest).is_err() {
            let what = if self.spec.geometry().is_some() {
                "max(out·OH·OW, C·H·W)·ld"
            } else {
                "max(rows, cols)·ld"
            };
            return Err(BackendError::Launch {
                layer: self.spec.layer().to_string(),
                op: self.spec.op().name(),
                message: format!("{what} = {largest} does not fit the kernels' int indices"),
            });
        }
        Ok(())
    }
}

fn operand<'a>(args: &'a Args<'_, DeviceBuffer>, which: Operand) -> Option<&'a DeviceBuffer> {
    match (args, which) {
        (Args::Spmm { values, .. }, Operand::Values) => Some(values),
        (Args::Spmm { x, .. }, Operand::X) => Some(x),
        (Args::Spmm { bias, .. }, Operand::Bias) => *bias,
        (Args::Spmm { y, .. }, Operand::Y) => Some(y),
        (Args::SpmmT { values, .. }, Operand::Values) => Some(values),
        (Args::SpmmT { dy, .. }, Operand::Dy) => Some(dy),
        (Args::SpmmT { dx, .. }, Operand::Dx) => Some(dx),
        (Args::Sddmm { dy, .. }, Operand::Dy) => Some(dy),
        (Args::Sddmm { x, .. }, Operand::X) => Some(x),
        (Args::Sddmm { dw, .. }, Operand::Dw) => Some(dw),
        (Args::DenseGrad { dy, .. }, Operand::Dy) => Some(dy),
        (Args::DenseGrad { x, .. }, Operand::X) => Some(x),
        (Args::DenseGrad { grad, .. }, Operand::Grad) => Some(grad),
        _ => None,
    }
}

fn buffers<'a>(args: &'a Args<'_, DeviceBuffer>) -> Vec<&'a DeviceBuffer> {
    match args {
        Args::Spmm { values, x, bias, y } => {
            let mut v = vec![*values, *x, &**y];
            v.extend(bias.iter().copied());
            v
        }
        Args::SpmmT { values, dy, dx } => vec![*values, *dy, &**dx],
        Args::Sddmm { dy, x, dw } => vec![*dy, *x, &**dw],
        Args::DenseGrad { dy, x, grad } => vec![*dy, *x, &**grad],
    }
}

impl Kernel for OpenClKernel {
    type Buffer = DeviceBuffer;

    fn spec(&self) -> &KernelSpec {
        &self.spec
    }

    fn strategy(&self) -> Strategy {
        self.compiled.strategy
    }

    /// Never: every emitted kernel returns early for work-items past the batch, and a
    /// work-item holding a vector of batch columns stores only its first `min(w, batch − b)`
    /// lanes (`sj_store`).
    fn writes_padding(&self) -> bool {
        false
    }

    fn run(&self, launch: Launch, args: Args<'_, DeviceBuffer>) -> Result<(), BackendError> {
        args.check(&self.spec, launch)?;
        for b in buffers(&args) {
            self.backend.check_own(b, self.spec.layer())?;
        }
        self.check_int_range(launch)?;
        let internal = |m: String| BackendError::Device(format!("{}: {m}", self.spec.layer()));
        let units = lock(&self.compiled.units);
        let mut events = Vec::with_capacity(units.len());
        for unit in units.iter() {
            let Some(global) = unit.entry.grid.global(launch.batch) else {
                continue; // an empty grid: nothing to compute
            };
            let kernel = &unit.kernel;
            for (i, arg) in unit.entry.args.iter().enumerate() {
                let i = i as u32;
                let set = match *arg {
                    KernelArg::Operand(which) => {
                        let buf = operand(&args, which).ok_or_else(|| {
                            internal(format!(
                                "kernel {} needs operand {which:?}",
                                unit.entry.name
                            ))
                        })?;
                        kernel.set_arg(i, &buf.buffer)
                    }
                    KernelArg::Batch => kernel.set_arg(i, launch.batch as i32),
                    KernelArg::Ld => kernel.set_arg(i, launch.ld as i32),
                    KernelArg::Array(_) | KernelArg::Int(_) => Ok(()), // set when created
                };
                set.map_err(|e| internal(format!("setting argument {i}: {e}")))?;
            }
            let mut event = Event::empty();
            // SAFETY: `args.check` has verified every buffer length against the spec
            // (values = nnz, inputs ≥ features·ld, outputs as the op requires, bias = rows),
            // every buffer belongs to this backend's context, and `check_int_range` ensures
            // no index overflows an int. The emitted kernels read and write only within those
            // bounds: rows < rows, columns < cols (the pattern is verified), batch columns
            // < batch ≤ ld (guarded against the rounded-up grid), nonzeros < nnz; convolution
            // kernels read input rows c·H·W + ih·W + iw only for taps inside the input
            // (0 ≤ ih < H, 0 ≤ iw < W, c < C from a verified column) and output rows
            // o·OH·OW + oh·OW + ow with o < out, oh < OH, ow < OW. The index
            // arrays were uploaded from the same verified pattern and are kept alive by
            // `Compiled`. Inputs and outputs are distinct buffers (`&` vs `&mut` borrows).
            unsafe {
                kernel
                    .cmd()
                    .global_work_size(global)
                    .local_work_size(unit.entry.grid.local)
                    .enew(&mut event)
                    .enq()
            }
            .map_err(|e| internal(format!("launching {}: {e}", unit.entry.name)))?;
            events.push(event);
        }
        drop(units);
        let ns = self.backend.finish_and_record(&events, self.spec.layer())?;
        self.compiled.last_ns.store(ns, Ordering::Relaxed);
        Ok(())
    }
}
