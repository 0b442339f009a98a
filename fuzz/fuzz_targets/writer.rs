//! The writer's path checks under any output path: in a scratch tree holding a working
//! folder, a home folder, a script folder, an input model, a folder of the user's, an
//! earlier output of mergec's, a temporary-folder leftover and links between them, any
//! relative path is checked as `run` checks it, its leftovers removed and a one-tensor
//! model written to it, with or without `--force`. Whatever happens, every file that is
//! not mergec's own output must still be there afterwards, unchanged.
#![no_main]

use std::fs;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mergec::io::writer::{self, ModelWriter, OutputSpec};
use mergec::io::DType;

/// Files that must survive every input, with their contents.
const KEPT: &[(&str, &str)] = &[
    ("work/notes.txt", "the working folder"),
    ("home/.profile", "the home folder"),
    ("scripts/merge.merge", "the script"),
    ("input/model.safetensors", "an input model"),
    ("input/config.json", "{}"),
    ("mine/data.txt", "a folder of the user's"),
    ("mine/sub/deep.txt", "deeper in it"),
];

fn root() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        // tmpfs where there is one: the writer syncs every file it writes.
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() { base.to_path_buf() } else { std::env::temp_dir() };
        let root = base.join(format!("mergec-fuzz-writer-{}", std::process::id()));
        fs::create_dir_all(root.join("work")).unwrap();
        std::env::set_current_dir(root.join("work")).unwrap();
        // SAFETY: set once, before any other thread of this process reads the environment.
        unsafe { std::env::set_var("HOME", root.join("home")) };
        root
    })
}

/// Puts the scratch tree back as it was before each input.
fn reset(root: &Path) {
    for entry in fs::read_dir(root).unwrap().flatten() {
        if entry.file_name() != "work" {
            let path = entry.path();
            if path.is_dir() && !path.is_symlink() {
                fs::remove_dir_all(&path).unwrap();
            } else {
                fs::remove_file(&path).unwrap();
            }
        }
    }
    for entry in fs::read_dir(root.join("work")).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() && !path.is_symlink() {
            fs::remove_dir_all(&path).unwrap();
        } else {
            fs::remove_file(&path).unwrap();
        }
    }
    for (file, text) in KEPT {
        let path = root.join(file);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }
    fs::create_dir_all(root.join("empty")).unwrap();
    // An earlier output of mergec's, which --force may replace, and a leftover of a
    // killed run beside it (a process id that cannot be alive).
    fs::create_dir_all(root.join("old")).unwrap();
    fs::write(root.join("old/.mergec"), "written by mergec\n").unwrap();
    fs::write(root.join("old/model.safetensors"), "old weights").unwrap();
    let links: &[(&str, &str)] = &[
        ("work/up", ".."),
        ("work/to-input", "../input"),
        ("work/to-mine", "../mine"),
        ("work/to-home", "../home"),
        ("work/loop", "loop"),
        ("work/dangling", "../nowhere"),
        ("to-work", "work"),
    ];
    for (link, target) in links {
        std::os::unix::fs::symlink(target, root.join(link)).unwrap();
    }
}

/// A path from the input that stays inside the scratch tree when read lexically from the
/// working folder (links inside the tree point inside it too).
fn path_from(text: &str) -> Option<PathBuf> {
    let path = Path::new(text);
    let mut depth = 1i32; // the working folder is one below the root
    for c in path.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => depth -= 1,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return None,
        }
        if depth < 0 {
            return None;
        }
    }
    (!text.is_empty() && !text.contains('\0')).then(|| path.to_path_buf())
}

fuzz_target!(|input: &[u8]| {
    let Some((&flags, rest)) = input.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let Some(dir) = path_from(text) else { return };
    let root = root();
    reset(root);
    let force = flags & 1 == 1;
    let protected = vec![root.join("input"), root.join("input/model.safetensors")];
    let scripts = root.join("scripts");

    if writer::check_output_target(&dir, force, &protected, Some(&scripts)).is_ok() {
        let _ = writer::remove_leftovers(&dir);
        let spec = OutputSpec {
            dir: dir.clone(),
            max_shard_bytes: u64::MAX,
            tensors: vec![("w".to_string(), DType::F32, vec![2])],
            config: None,
            copied_files: Vec::new(),
            generated_files: vec![("README.md".to_string(), b"# merged\n".to_vec().into())],
            force,
            protected,
        };
        if let Ok(mut w) = ModelWriter::create(spec) {
            if w.write_tensor("w", &[0u8; 8]).is_ok() {
                let _ = w.finish();
            }
        }
    }

    for (file, text) in KEPT {
        let found = fs::read_to_string(root.join(file)).ok();
        assert_eq!(
            found.as_deref(),
            Some(*text),
            "`{file}` was changed or removed by an output at `{}` (force: {force})",
            dir.display()
        );
    }
});
