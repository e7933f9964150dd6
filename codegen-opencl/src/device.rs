//! What the emitters and the planner need to know about a device, without OpenCL.
//!
//! [`DeviceInfo`] is what `crate::probe` reports for every OpenCL device (feature `opencl`);
//! [`DeviceProfile`] is the part of it that shapes the emitted code and the plan — the device
//! kind and its limits — and can be built by hand (e.g. [`DeviceProfile::nvidia_gpu`]) to emit
//! code for a device that is not present.

use std::fmt;

/// The kind of an OpenCL device, as far as code generation cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// A CPU device (PoCL): work-groups run as loops over work-items, vectorised along
    /// dimension 0; large work-groups, no local-memory tiling.
    Cpu,
    /// A GPU: many small work-groups, coalesced loads along dimension 0, local-memory
    /// reductions and tiles.
    Gpu,
    /// An accelerator or anything else: treated like a GPU.
    Other,
}

impl DeviceKind {
    /// `cpu`, `gpu` or `other`.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Gpu => "gpu",
            DeviceKind::Other => "other",
        }
    }

    /// Whether the device wants GPU-style code (small work-groups, local memory).
    pub fn is_gpu_like(self) -> bool {
        !matches!(self, DeviceKind::Cpu)
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One OpenCL device found by probing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Index of the platform in the platform list.
    pub platform_index: usize,
    /// Index of the device within its platform.
    pub device_index: usize,
    /// The platform's name, e.g. `Portable Computing Language`.
    pub platform: String,
    /// The device's name.
    pub name: String,
    /// The device's vendor.
    pub vendor: String,
    /// The OpenCL version string of the device.
    pub version: String,
    /// CPU, GPU or other.
    pub kind: DeviceKind,
    /// `CL_DEVICE_MAX_COMPUTE_UNITS`.
    pub compute_units: usize,
    /// `CL_DEVICE_MAX_WORK_GROUP_SIZE`.
    pub max_work_group_size: usize,
    /// `CL_DEVICE_MAX_CONSTANT_BUFFER_SIZE` in bytes.
    pub max_constant_buffer_size: usize,
    /// `CL_DEVICE_GLOBAL_MEM_SIZE` in bytes.
    pub global_mem_size: u64,
}

impl DeviceInfo {
    /// The profile that shapes code for this device.
    pub fn profile(&self) -> DeviceProfile {
        DeviceProfile {
            kind: self.kind,
            max_constant_buffer_size: self.max_constant_buffer_size,
            max_work_group_size: self.max_work_group_size,
        }
    }

    /// A one-line description: `opencl/<kind>/<platform>/<device>`, used in cache keys.
    pub fn describe(&self) -> String {
        format!(
            "opencl/{}/{}/{}",
            self.kind,
            self.platform.trim(),
            self.name.trim()
        )
    }
}

/// The device properties that the emitted code and the plan depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceProfile {
    /// CPU, GPU or other.
    pub kind: DeviceKind,
    /// `CL_DEVICE_MAX_CONSTANT_BUFFER_SIZE` in bytes (64 KiB on NVIDIA, 2 MiB on PoCL).
    pub max_constant_buffer_size: usize,
    /// `CL_DEVICE_MAX_WORK_GROUP_SIZE`.
    pub max_work_group_size: usize,
}

impl DeviceProfile {
    /// PoCL on a CPU, as Debian's `pocl-opencl-icd` reports it.
    pub fn pocl_cpu() -> Self {
        DeviceProfile {
            kind: DeviceKind::Cpu,
            max_constant_buffer_size: 2 << 20,
            max_work_group_size: 4096,
        }
    }

    /// An NVIDIA GPU through the vendor driver.
    pub fn nvidia_gpu() -> Self {
        DeviceProfile {
            kind: DeviceKind::Gpu,
            max_constant_buffer_size: 64 << 10,
            max_work_group_size: 1024,
        }
    }

    /// The work-group shapes used on this device.
    pub fn work_groups(&self) -> WorkGroups {
        let wg = match self.kind {
            // PoCL runs a work-group as one task, looping over its work-items; it does not
            // vectorise that loop around the kernels' own loops, so each work-item computes 16
            // batch columns with explicit float16 vectors.
            DeviceKind::Cpu => WorkGroups {
                rows: [1, 16],
                batch_vector: 16,
                // straight-line code has no loops, so PoCL vectorises across work-items
                unrolled: [16, 1],
                sddmm_lanes: 1,
                sddmm_items: 64,
                dense: [16, 4],
                dense_tiled: false,
            },
            // GPUs: a warp spans 32 batch columns of one row (coalesced, no divergence in
            // the unrolled switch), 128 work-items per group; reductions in local memory.
            DeviceKind::Gpu | DeviceKind::Other => WorkGroups {
                rows: [32, 4],
                batch_vector: 1,
                unrolled: [32, 4],
                sddmm_lanes: 32,
                sddmm_items: 4,
                dense: [16, 16],
                dense_tiled: true,
            },
        };
        wg.clamped(self.max_work_group_size)
    }

    /// The bytes of `__constant` tables one program may hold: the device's constant buffer
    /// less 1 KiB for whatever else the compiler places there.
    pub fn table_budget(&self) -> usize {
        self.max_constant_buffer_size.saturating_sub(1024)
    }
}

/// Work-group shapes, `[dimension 0, dimension 1]`; dimension 0 runs along the batch for
/// `spmm`/`spmm_t`, along the lanes of a reduction for `sddmm` and along the columns of the
/// gradient for `dense_grad`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WorkGroups {
    /// `spmm` and `spmm_t`: `[batch vectors, rows]` per group.
    pub rows: [usize; 2],
    /// `spmm` and `spmm_t`: batch columns per work-item, as one OpenCL vector (1: scalar,
    /// one column per work-item, as GPUs want for coalesced loads).
    pub batch_vector: usize,
    /// `unrolled` `spmm` and `spmm_t`: `[batch columns, rows]` per group; one batch column
    /// per work-item (scalar straight-line code).
    pub unrolled: [usize; 2],
    /// `sddmm`: work-items that share one nonzero's reduction over the batch (1: none).
    pub sddmm_lanes: usize,
    /// `sddmm`: nonzeros per work-group.
    pub sddmm_items: usize,
    /// `dense_grad`: `[gradient columns, gradient rows]` per group (a square tile if tiled).
    pub dense: [usize; 2],
    /// `dense_grad`: whether to stage tiles of `dY` and `X` in local memory.
    pub dense_tiled: bool,
}

impl WorkGroups {
    fn clamped(mut self, max: usize) -> Self {
        let max = max.max(1);
        while self.rows[0] * self.rows[1] > max {
            if self.rows[1] > 1 {
                self.rows[1] /= 2;
            } else {
                self.rows[0] /= 2;
            }
        }
        while self.unrolled[0] * self.unrolled[1] > max {
            if self.unrolled[1] > 1 {
                self.unrolled[1] /= 2;
            } else {
                self.unrolled[0] /= 2;
            }
        }
        self.unrolled = [self.unrolled[0].max(1), self.unrolled[1].max(1)];
        while self.sddmm_lanes * self.sddmm_items > max {
            if self.sddmm_items > 1 {
                self.sddmm_items /= 2;
            } else {
                self.sddmm_lanes /= 2;
            }
        }
        while self.dense[0] * self.dense[1] > max {
            self.dense = [self.dense[0] / 2, self.dense[1] / 2];
        }
        self.dense = [self.dense[0].max(1), self.dense[1].max(1)];
        self.rows = [self.rows[0].max(1), self.rows[1].max(1)];
        self.sddmm_lanes = self.sddmm_lanes.max(1);
        if self.dense_tiled && self.dense[0] != self.dense[1] {
            self.dense_tiled = false;
        }
        self
    }
}

/// The environment variable naming the device `OpenClBackend::preferred` (feature `opencl`) opens: an index
/// into `probe`'s list.
pub const DEVICE_ENV: &str = "SPARSEJIT_OPENCL_DEVICE";

/// The device `OpenClBackend::preferred` (feature `opencl`) opens among `devices`: index `choice` when given
/// (an error naming the valid range otherwise), else the first GPU-like device, else the
/// first one.
pub fn select_device<'a>(
    devices: &'a [DeviceInfo],
    choice: Option<&str>,
) -> Result<&'a DeviceInfo, sparse_ir::BackendError> {
    if devices.is_empty() {
        return Err(sparse_ir::BackendError::NoPlatform);
    }
    if let Some(text) = choice {
        let index: usize = text.trim().parse().map_err(|_| {
            sparse_ir::BackendError::Device(format!(
                "{DEVICE_ENV}={text:?} is not a device index (0..{})",
                devices.len()
            ))
        })?;
        return devices.get(index).ok_or_else(|| {
            sparse_ir::BackendError::Device(format!(
                "{DEVICE_ENV}={index}, but there are only {} OpenCL device(s): {}",
                devices.len(),
                devices
                    .iter()
                    .enumerate()
                    .map(|(i, d)| format!("{i}: {}", d.describe()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        });
    }
    Ok(devices
        .iter()
        .find(|d| d.kind.is_gpu_like())
        .unwrap_or(&devices[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_groups_differ_by_kind_and_respect_the_limit() {
        let cpu = DeviceProfile::pocl_cpu().work_groups();
        let gpu = DeviceProfile::nvidia_gpu().work_groups();
        assert_ne!(cpu, gpu);
        assert_eq!(cpu.sddmm_lanes, 1);
        assert!(gpu.dense_tiled && !cpu.dense_tiled);
        let tiny = DeviceProfile {
            max_work_group_size: 8,
            ..DeviceProfile::nvidia_gpu()
        }
        .work_groups();
        assert!(tiny.rows[0] * tiny.rows[1] <= 8);
        assert!(tiny.unrolled[0] * tiny.unrolled[1] <= 8);
        assert!(tiny.sddmm_lanes * tiny.sddmm_items <= 8);
        assert!(tiny.dense[0] * tiny.dense[1] <= 8);
        assert!(tiny.rows.iter().chain(&tiny.dense).all(|&d| d >= 1));
    }

    fn info(kind: DeviceKind, name: &str) -> DeviceInfo {
        DeviceInfo {
            platform_index: 0,
            device_index: 0,
            platform: "p".into(),
            name: name.into(),
            vendor: "v".into(),
            version: "OpenCL 3.0".into(),
            kind,
            compute_units: 1,
            max_work_group_size: 256,
            max_constant_buffer_size: 64 << 10,
            global_mem_size: 0,
        }
    }

    #[test]
    fn select_device_prefers_a_gpu_and_honours_an_index() {
        let devices = [info(DeviceKind::Cpu, "pocl"), info(DeviceKind::Gpu, "h100")];
        assert_eq!(select_device(&devices, None).unwrap().name, "h100");
        assert_eq!(select_device(&devices, Some("0")).unwrap().name, "pocl");
        assert_eq!(select_device(&devices[..1], None).unwrap().name, "pocl");
        let e = select_device(&devices, Some("2")).unwrap_err().to_string();
        assert!(
            e.contains("only 2 OpenCL device(s)") && e.contains("1: opencl/gpu/p/h100"),
            "{e}"
        );
        let e = select_device(&devices, Some("gpu"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("SPARSEJIT_OPENCL_DEVICE") && e.contains("not a device index"),
            "{e}"
        );
        assert!(matches!(
            select_device(&[], None),
            Err(sparse_ir::BackendError::NoPlatform)
        ));
    }

    #[test]
    fn table_budget_leaves_room() {
        assert_eq!(DeviceProfile::nvidia_gpu().table_budget(), 63 * 1024);
    }
}
