//! TypeScript to JavaScript, in process (oxc), keeping a position map so that errors raised by
//! the engine on the generated JavaScript name lines of the file the user wrote.

use super::ScriptError;
use oxc::allocator::Allocator;
use oxc::codegen::{Codegen, CodegenOptions};
use oxc::parser::Parser;
use oxc::semantic::SemanticBuilder;
use oxc::span::SourceType;
use oxc::transformer::{TransformOptions, Transformer};
use std::path::Path;

/// One source file made runnable.
#[derive(Debug, Clone)]
pub(super) struct Compiled {
    pub js: String,
    /// `(js line, js column, source line, source column)`, all 0-based, sorted by js position.
    /// Empty when the JavaScript is the source text itself.
    map: Vec<(u32, u32, u32, u32)>,
}

impl Compiled {
    /// The 1-based source position of a 1-based position in the generated JavaScript.
    pub(super) fn source_position(&self, line: u32, column: u32) -> (u32, u32) {
        if self.map.is_empty() || line == 0 {
            return (line, column);
        }
        let key = (line - 1, column.saturating_sub(1));
        let i = self.map.partition_point(|t| (t.0, t.1) <= key);
        // The closest mapping at or before the position, on the same generated line if possible.
        let t = match i.checked_sub(1).map(|j| self.map[j]) {
            Some(t) if t.0 == key.0 => t,
            _ => match self.map.get(i) {
                Some(t) if t.0 == key.0 => *t,
                _ => match i.checked_sub(1) {
                    Some(j) => self.map[j],
                    None => return (line, column),
                },
            },
        };
        (t.2 + 1, t.3 + 1)
    }
}

/// 1-based line and column of a byte offset.
pub(super) fn line_col(text: &str, offset: usize) -> (u32, u32) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() as u32 + 1;
    let col = before
        .rfind('\n')
        .map_or(before.chars().count(), |i| before[i + 1..].chars().count()) as u32
        + 1;
    (line, col)
}

fn is_typescript(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("ts" | "mts" | "cts")
    )
}

/// Parses `text` (the contents of `path`) and, for TypeScript, strips the types. JavaScript is
/// only checked, so its positions need no mapping.
pub(super) fn compile(path: &Path, text: &str) -> Result<Compiled, ScriptError> {
    let allocator = Allocator::default();
    let ts = is_typescript(path);
    let source_type = if ts {
        SourceType::ts().with_module(true)
    } else {
        SourceType::mjs()
    };
    let parsed = Parser::new(&allocator, text, source_type).parse();
    if let Some(d) = parsed.diagnostics.first() {
        let offset = d.labels.as_ref().first().map_or(0, |l| l.offset());
        let (line, column) = line_col(text, offset as usize);
        return Err(ScriptError::Syntax {
            file: path.display().to_string(),
            line,
            column,
            message: d.message.to_string(),
        });
    }
    if !ts {
        return Ok(Compiled {
            js: text.to_string(),
            map: Vec::new(),
        });
    }
    let mut program = parsed.program;
    let scoping = SemanticBuilder::new()
        .build(&program)
        .semantic
        .into_scoping();
    let options = TransformOptions::default();
    let transformed =
        Transformer::new(&allocator, path, &options).build_with_scoping(scoping, &mut program);
    if let Some(d) = transformed.diagnostics.first() {
        let offset = d.labels.as_ref().first().map_or(0, |l| l.offset());
        let (line, column) = line_col(text, offset as usize);
        return Err(ScriptError::Syntax {
            file: path.display().to_string(),
            line,
            column,
            message: d.message.to_string(),
        });
    }
    let out = Codegen::new()
        .with_options(CodegenOptions {
            source_map_path: Some(path.to_path_buf()),
            ..CodegenOptions::default()
        })
        .build(&program);
    let mut map: Vec<(u32, u32, u32, u32)> = out
        .map
        .as_ref()
        .map(|m| {
            m.get_tokens()
                .map(|t| {
                    (
                        t.get_dst_line(),
                        t.get_dst_col(),
                        t.get_src_line(),
                        t.get_src_col(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    map.sort_unstable();
    Ok(Compiled { js: out.code, map })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_types_and_type_only_imports() {
        let src = "import * as api from \"cdc-sink@v1\";\nimport { Document, Table } from \"cdc-sink@v1\";\nexport function f(x: number): Record<Table, Document[]> {\n  let r: Document = api.x;\n  return r as any;\n}\n";
        let c = compile(Path::new("/x/a.ts"), src).unwrap();
        assert!(c.js.contains("import * as api"), "{}", c.js);
        assert!(!c.js.contains("Document"), "{}", c.js);
        assert!(!c.js.contains(": number"), "{}", c.js);
    }

    #[test]
    fn maps_generated_lines_back_to_typescript() {
        let src = "interface A {\n  x: number;\n}\n\ntype B = string;\n\nexport function f() {\n  throw new Error(\"boom\");\n}\n";
        let c = compile(Path::new("/x/a.ts"), src).unwrap();
        let (js_line, _) =
            c.js.lines()
                .enumerate()
                .find(|(_, l)| l.contains("throw"))
                .map(|(i, l)| (i as u32 + 1, l))
                .unwrap();
        let col =
            c.js.lines()
                .nth(js_line as usize - 1)
                .unwrap()
                .find("throw")
                .unwrap() as u32
                + 1;
        assert_eq!(c.source_position(js_line, col).0, 8);
    }

    #[test]
    fn syntax_errors_name_file_line_and_column() {
        let e = compile(Path::new("/x/bad.ts"), "let a = 1;\nlet b: = 2;\n").unwrap_err();
        match e {
            ScriptError::Syntax { file, line, .. } => {
                assert_eq!(file, "/x/bad.ts");
                assert_eq!(line, 2);
            }
            other => panic!("{other}"),
        }
    }
}
