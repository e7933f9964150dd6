//! Compiling chunk functions to executable memory, and the global cache of live chunk code.
//!
//! Each chunk's machine code lives in its own anonymous executable mapping ([`memmap2::Mmap`])
//! owned by an [`Arc<ChunkCode>`]; the mapping is unmapped when the last kernel holding the
//! `Arc` is dropped. The global cache maps a [`ChunkKey`] to a [`Weak`] reference, so a chunk
//! whose code is still alive in any kernel is reused instead of compiled again, and code that
//! no kernel uses is gone. A hit is confirmed by comparing the chunk's full structure, so a
//! hash collision can never hand out code for another pattern.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock, Weak};

use cranelift_codegen::control::ControlPlane;
use cranelift_codegen::isa::{OwnedTargetIsa, TargetIsa};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_codegen::Context;
use cranelift_frontend::FunctionBuilderContext;

use super::emit::{build_function, ChunkOp, ChunkSource, Shape};
use super::{OptLevel, Regalloc};

/// The code generator settings that change the machine code (part of the cache key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct CodegenConfig {
    pub opt_level: OptLevel,
    pub regalloc: Regalloc,
    pub verifier: bool,
}

/// Identifies one chunk's code: everything the generated code depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ChunkKey {
    pub op: ChunkOp,
    pub shape: Shape,
    pub opt_level: OptLevel,
    pub regalloc: Regalloc,
    /// Content hash of the chunk's rows (plus its value positions for `spmm_t`).
    pub hash: u64,
    pub rows: usize,
    pub cols: usize,
    pub nnz: usize,
}

/// One chunk's compiled, executable code.
pub(crate) struct ChunkCode {
    key: ChunkKey,
    /// The chunk's structure: local `row_ptr`, `col_idx`, then value positions (`spmm_t`).
    content: Box<[u32]>,
    code: memmap2::Mmap,
    code_len: usize,
    clif: OnceLock<String>,
    disasm: OnceLock<String>,
    vcode: OnceLock<String>,
}

impl ChunkCode {
    /// Start of the function.
    pub fn entry(&self) -> *const u8 {
        self.code.as_ptr()
    }

    /// Bytes of machine code.
    pub fn code_len(&self) -> usize {
        self.code_len
    }

    /// The CLIF text, if it was captured.
    pub fn clif(&self) -> Option<&str> {
        self.clif.get().map(String::as_str)
    }

    /// The disassembly, if it was captured.
    pub fn disasm(&self) -> Option<&str> {
        self.disasm.get().map(String::as_str)
    }

    /// Cranelift's VCode listing (machine instructions after register allocation), if it was
    /// captured together with the disassembly.
    pub fn vcode(&self) -> Option<&str> {
        self.vcode.get().map(String::as_str)
    }
}

impl Drop for ChunkCode {
    fn drop(&mut self) {
        LIVE_CHUNKS.fetch_sub(1, Ordering::Relaxed);
        LIVE_CODE_BYTES.fetch_sub(self.code_len, Ordering::Relaxed);
    }
}

static LIVE_CHUNKS: AtomicUsize = AtomicUsize::new(0);
static LIVE_CODE_BYTES: AtomicUsize = AtomicUsize::new(0);
static CACHE: LazyLock<Mutex<HashMap<ChunkKey, Weak<ChunkCode>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));
static ISAS: LazyLock<Mutex<HashMap<CodegenConfig, OwnedTargetIsa>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// Chunk functions alive in this process and their machine code bytes.
pub(crate) fn live() -> (usize, usize) {
    (
        LIVE_CHUNKS.load(Ordering::Relaxed),
        LIVE_CODE_BYTES.load(Ordering::Relaxed),
    )
}

/// The host ISA with these settings (built once per configuration).
pub(crate) fn isa_for(config: CodegenConfig) -> Result<OwnedTargetIsa, String> {
    let mut isas = ISAS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(isa) = isas.get(&config) {
        return Ok(isa.clone());
    }
    let mut flags = settings::builder();
    let set = |flags: &mut settings::Builder, name: &str, value: &str| {
        flags
            .set(name, value)
            .map_err(|e| format!("cranelift setting {name}={value}: {e}"))
    };
    set(&mut flags, "opt_level", config.opt_level.name())?;
    set(&mut flags, "regalloc_algorithm", config.regalloc.name())?;
    set(
        &mut flags,
        "enable_verifier",
        if config.verifier { "true" } else { "false" },
    )?;
    // Leaf functions that call nothing: no unwind tables, no PIC.
    set(&mut flags, "unwind_info", "false")?;
    set(&mut flags, "is_pic", "false")?;
    let builder = cranelift_native::builder().map_err(|e| format!("host ISA: {e}"))?;
    let isa = builder
        .finish(settings::Flags::new(flags))
        .map_err(|e| format!("host ISA: {e}"))?;
    isas.insert(config, isa.clone());
    Ok(isa)
}

/// Whether the ISA has fused multiply-add.
pub(crate) fn has_fma(isa: &dyn TargetIsa) -> bool {
    isa.isa_flags()
        .iter()
        .any(|v| v.name == "has_fma" && v.as_bool() == Some(true))
}

/// What to compile for one chunk.
pub(crate) struct Job<'a> {
    pub key: ChunkKey,
    pub content: Vec<u32>,
    pub src: ChunkSource<'a>,
}

/// Looks a chunk up in the global cache (confirming its structure).
pub(crate) fn lookup(key: &ChunkKey, content: &[u32]) -> Option<Arc<ChunkCode>> {
    let cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let code = cache.get(key)?.upgrade()?;
    (*code.content == *content).then_some(code)
}

/// Publishes freshly compiled code; if an equal chunk became alive meanwhile, returns that one
/// instead (and the new code is dropped). Also forgets dead entries.
pub(crate) fn publish(code: Arc<ChunkCode>) -> Arc<ChunkCode> {
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(existing) = cache.get(&code.key).and_then(Weak::upgrade) {
        if existing.content == code.content {
            return existing;
        }
    }
    cache.insert(code.key.clone(), Arc::downgrade(&code));
    if cache.len() > 64 && cache.len() > 2 * LIVE_CHUNKS.load(Ordering::Relaxed) {
        cache.retain(|_, weak| weak.strong_count() > 0);
    }
    code
}

/// Text to capture while compiling.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Capture {
    pub clif: bool,
    pub disasm: bool,
}

/// Compiles one chunk into executable memory.
pub(crate) fn compile_job(
    isa: &dyn TargetIsa,
    fctx: &mut FunctionBuilderContext,
    ctx: &mut Context,
    index: u32,
    job: &Job<'_>,
    capture: Capture,
) -> Result<Arc<ChunkCode>, String> {
    let func = build_function(isa, fctx, index, job.key.op, &job.src, &job.key.shape);
    let clif = capture.clif.then(|| func.display().to_string());
    ctx.clear();
    ctx.func = func;
    ctx.set_disasm(capture.disasm);
    let compiled = ctx
        .compile(isa, &mut ControlPlane::default())
        .map_err(|e| format!("{:?}", e.inner))?;
    if !compiled.buffer.relocs().is_empty() {
        return Err(format!(
            "generated code needs {} relocations (external calls are not supported)",
            compiled.buffer.relocs().len()
        ));
    }
    let bytes = compiled.code_buffer();
    let (disasm, vcode) = if capture.disasm {
        (Some(disassemble(isa, compiled)?), compiled.vcode.clone())
    } else {
        (None, None)
    };
    let mut map = memmap2::MmapMut::map_anon(bytes.len().max(1))
        .map_err(|e| format!("allocating {} bytes of code memory: {e}", bytes.len()))?;
    map[..bytes.len()].copy_from_slice(bytes);
    let code = map
        .make_exec()
        .map_err(|e| format!("making code memory executable: {e}"))?;
    let code_len = bytes.len();
    LIVE_CHUNKS.fetch_add(1, Ordering::Relaxed);
    LIVE_CODE_BYTES.fetch_add(code_len, Ordering::Relaxed);
    let chunk = ChunkCode {
        key: job.key.clone(),
        content: job.content.clone().into_boxed_slice(),
        code,
        code_len,
        clif: OnceLock::new(),
        disasm: OnceLock::new(),
        vcode: OnceLock::new(),
    };
    if let Some(text) = clif {
        let _ = chunk.clif.set(text);
    }
    if let Some(text) = disasm {
        let _ = chunk.disasm.set(text);
    }
    if let Some(text) = vcode {
        let _ = chunk.vcode.set(text);
    }
    Ok(Arc::new(chunk))
}

/// Fills in the text dumps of an already compiled chunk (compiling it again on the side; the
/// running code is not replaced).
pub(crate) fn fill_text(
    isa: &dyn TargetIsa,
    fctx: &mut FunctionBuilderContext,
    ctx: &mut Context,
    index: u32,
    job: &Job<'_>,
    code: &ChunkCode,
    capture: Capture,
) -> Result<(), String> {
    let func = build_function(isa, fctx, index, job.key.op, &job.src, &job.key.shape);
    if capture.clif && code.clif.get().is_none() {
        let _ = code.clif.set(func.display().to_string());
    }
    if capture.disasm && code.disasm.get().is_none() {
        ctx.clear();
        ctx.func = func;
        ctx.set_disasm(true);
        let compiled = ctx
            .compile(isa, &mut ControlPlane::default())
            .map_err(|e| format!("{:?}", e.inner))?;
        let _ = code.disasm.set(disassemble(isa, compiled)?);
        if let Some(vcode) = compiled.vcode.clone() {
            let _ = code.vcode.set(vcode);
        }
    }
    Ok(())
}

/// The machine code as text: Capstone's disassembly with the `disas` feature, otherwise
/// Cranelift's listing of the final machine instructions (after register allocation).
fn disassemble(
    isa: &dyn TargetIsa,
    compiled: &cranelift_codegen::CompiledCode,
) -> Result<String, String> {
    #[cfg(feature = "disas")]
    {
        let cs = isa.to_capstone().map_err(|e| format!("capstone: {e}"))?;
        compiled
            .disassemble(None, &cs)
            .map_err(|e| format!("disassembling: {e}"))
    }
    #[cfg(not(feature = "disas"))]
    {
        let _ = isa;
        compiled
            .vcode
            .clone()
            .ok_or_else(|| "the code generator gave no listing".to_string())
    }
}
