//! The `#[idempotent]` attribute of [idem](https://docs.rs/idem-runtime).
//!
//! Depend on `idem-runtime`, which re-exports this attribute and documents it in full. This
//! crate only parses, validates and expands: every behaviour lives in the runtime, reached
//! through `idem_runtime::__private`.
//!
//! The pipeline: `args` parses and validates the arguments, `handler` checks the
//! signature, `expand` emits the new function. On any error the original function is
//! emitted unchanged next to the `compile_error!`s, so one mistake gives one message.

use proc_macro::TokenStream;
use quote::ToTokens;
use syn::ItemFn;

mod args;
mod errors;
mod expand;
mod handler;

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
    let args = args::parse(attr, &mut errors);
    args::validate(&args, attribute_span, &mut errors);
    let store = args.store.map(|(kind, _)| kind);
    let handler = handler::check(&function.sig, store, &mut errors);
    if !args.unparsable && args.scope.is_none() && !args.present.iter().any(|p| p == "scope") {
        handler::require_scope_where_the_default_is_shared(&function.sig, &mut errors);
    }

    match (errors.is_empty(), store, args.strategy, handler) {
        (true, Some(store), Some((strategy, _)), Some(handler)) if args.key.is_some() => {
            expand::expand(expand::Expansion {
                item: &function,
                args: &args,
                store,
                strategy,
                handler,
            })
        }
        _ => {
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
