//! The `#[idempotent]` attribute of [idem](https://docs.rs/idem-runtime).
//!
//! Depend on `idem-runtime`, which re-exports this attribute and documents it in full. This
//! crate only parses, validates and expands: every behaviour lives in the runtime, reached
//! through `idem_runtime::__private`.
//!
//! The pipeline, in two phases like tokio-macros': `parse` reads each argument as the one list
//! of them, `arguments`, says, and `config::validate` checks them together and produces a
//! typed `Config` only when all is well; `handler` checks the signature; `expand` emits the new
//! function from the `Config` alone. Every error of one attribute is reported at once, and on
//! any error the original function is emitted unchanged next to the `compile_error!`s, so one
//! mistake gives one message.

use proc_macro::TokenStream;
use quote::ToTokens;
use syn::ItemFn;

mod arguments;
mod config;
mod errors;
mod expand;
mod handler;
mod parse;

/// Makes an async message handler idempotent. See `idem_runtime::idempotent` for the
/// arguments, the generated signature and the equivalent code.
#[proc_macro_attribute]
pub fn idempotent(attr: TokenStream, item: TokenStream) -> TokenStream {
    idempotent_impl(attr.into(), item.into()).into()
}

fn idempotent_impl(
    attr: proc_macro2::TokenStream,
    item: proc_macro2::TokenStream,
) -> proc_macro2::TokenStream {
    let mut errors = errors::Errors::default();
    let attribute_span = attr_span(&attr);
    let function: ItemFn = match syn::parse2(item.clone()) {
        Ok(function) => function,
        Err(error) => {
            let message = syn::Error::new(
                error.span(),
                "`#[idempotent]` applies to an `async fn` handler",
            );
            let mut out = message.into_compile_error();
            out.extend(item);
            return out;
        }
    };
    let parsed = parse::parse(attr, &mut errors);
    let store = parsed.store.map(|(kind, _)| kind);
    let batch = parsed.batch.is_some();
    // A misspelt `scope` counts as written: it is reported once, as misspelt.
    let scope_written = parsed.unparsable || parsed.has(arguments::Name::Scope);
    let config = config::validate(parsed, attribute_span, &mut errors);
    let handler = handler::check(&function.sig, store, batch, &mut errors);
    if !scope_written {
        handler::require_scope_where_the_default_is_shared(&function.sig, &mut errors);
    }

    match (config, handler) {
        (Some(config), Some(handler)) if errors.is_empty() => expand::expand(expand::Expansion {
            item: &function,
            config: &config,
            handler,
        }),
        _ => {
            if errors.is_empty() {
                // Every refusal above reports its reason; never drop the handler silently.
                errors.error(
                    attribute_span,
                    "internal error in #[idempotent]: the handler was refused without a reason; please report this",
                );
            }
            let mut out = errors.into_compile_errors();
            // The original function, so that one mistake gives one message; without `const`,
            // which rustc would reject again next to our error about it.
            let mut function = function;
            function.sig.constness = None;
            out.extend(function.into_token_stream());
            out
        }
    }
}

/// The span for "missing argument" errors: the attribute's arguments, or the call site when
/// there are none.
fn attr_span(attr: &proc_macro2::TokenStream) -> proc_macro2::Span {
    let mut tokens = attr.clone().into_iter();
    match (tokens.next(), tokens.last()) {
        (Some(first), Some(last)) => first.span().join(last.span()).unwrap_or(first.span()),
        (Some(only), None) => only.span(),
        _ => proc_macro2::Span::call_site(),
    }
}
